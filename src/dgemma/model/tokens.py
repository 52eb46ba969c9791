"""Tokenization and the Gemma chat template, shared by the CLI, Triton pre/post-processing, client and tests.

Loads the checkpoint's own `tokenizer.json` with the `tokenizers` library (real checkpoint and tiny
default alike) and renders the non-thinking Gemma-4 chat prompt (spec §3). Knows nothing of models.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import CheckpointError, RequestError

# Gemma-4 special tokens and their ids in the real vocabulary (spec §3); the tiny tokenizer keeps the same ids.
SPECIAL_IDS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<|tool_response>": 50, "<|think|>": 98, "<|channel>": 100,
    "<channel|>": 101, "<|turn>": 105, "<turn|>": 106,
}
NEWLINE_ID = 107


def chat_prompt(user_text: str) -> str:
    """Non-thinking single-turn prompt, as rendered by the checkpoint's chat template (spec §3)."""
    return f"<bos><|turn>user\n{user_text}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


class Tokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        f = path / "tokenizer.json" if path.is_dir() else path
        if not f.exists():
            raise CheckpointError(f"{f} not found: the checkpoint must ship its tokenizer.json.")
        try:
            self.tok = HFTokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises a plain Exception subclass
            raise CheckpointError(f"{f} is not a loadable tokenizer.json ({e}).") from None
        self.path = f

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Encode text in which special tokens (<bos>, <|turn>, ...) are written literally."""
        if not isinstance(text, str):
            raise RequestError(f"prompt must be text (got {type(text).__name__}).")
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_chat(self, user_text: str) -> list[int]:
        if not user_text or not user_text.strip():
            raise RequestError("prompt is empty; give some text to answer.")
        return self.encode(chat_prompt(user_text))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def build_byte_tokenizer(vocab_size: int, extra_special: dict[str, int] | None = None):
    """A byte-level tokenizer (no merges) with the Gemma special tokens at their real ids.

    Every UTF-8 text round-trips. Bytes take ids after the reserved block; "\\n" is id 107 as in Gemma.
    Used by the tiny default checkpoint, which cannot ship Gemma's 262k vocabulary.
    """
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    byte_chars = sorted(ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    specials = dict(SPECIAL_IDS, **(extra_special or {}))
    vocab: dict[str, int] = {}
    for name, i in specials.items():
        vocab[name] = i
    nl = _char_of_byte(10)
    vocab[nl] = NEWLINE_ID
    next_id = NEWLINE_ID + 1
    for ch in byte_chars:
        if ch == nl:
            continue
        while next_id in vocab.values() or next_id in specials.values():
            next_id += 1
        vocab[ch] = next_id
        next_id += 1
    used = set(vocab.values())
    for i in range(vocab_size):
        if i not in used:
            vocab[f"<unused{i}>"] = i
            specials[f"<unused{i}>"] = i
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"byte tokenizer needs a vocabulary of at least {max(vocab.values()) + 1}")
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


_BYTE_TO_CHAR: dict[int, str] = {}


def _char_of_byte(b: int) -> str:
    if not _BYTE_TO_CHAR:
        # GPT-2 byte-to-unicode table, as used by the ByteLevel pre-tokenizer
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs, n = bs[:], 0
        for x in range(256):
            if x not in bs:
                bs.append(x)
                cs.append(256 + n)
                n += 1
        _BYTE_TO_CHAR.update({x: chr(c) for x, c in zip(bs, cs)})
    return _BYTE_TO_CHAR[b]


def _byte_of(ch: str) -> int:
    _char_of_byte(0)
    return {c: b for b, c in _BYTE_TO_CHAR.items()}[ch]

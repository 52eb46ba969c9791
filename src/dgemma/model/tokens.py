"""Tokenization and the Gemma chat template, shared by the CLI, Triton pre/post-processing, client and tests.

Loads the checkpoint's own `tokenizer.json` with the `tokenizers` library (real checkpoint and tiny
default alike) and renders the non-thinking Gemma-4 chat prompt (spec §3): one user turn (`chat_prompt`) or a
whole conversation (`render_chat`: the checkpoint's own jinja `chat_template` in a sandbox when it ships one,
else the same format over several turns). Knows nothing of models.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..core.errors import CheckpointError, RequestError

# Gemma-4 special tokens and their ids in the real vocabulary (spec §3); the tiny tokenizer keeps the same ids.
SPECIAL_IDS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<|tool_response>": 50, "<|think|>": 98, "<|channel>": 100,
    "<channel|>": 101, "<|turn>": 105, "<turn|>": 106,
}
NEWLINE_ID = 107


GENERATION_PROMPT = "<|turn>model\n<|channel>thought\n<channel|>"  # non-thinking: an empty thought channel
CHAT_ROLES = ("system", "user", "assistant")  # OpenAI's "developer" is taken as "system"


def chat_prompt(user_text: str) -> str:
    """Non-thinking single-turn prompt, as rendered by the checkpoint's chat template (spec §3)."""
    return f"<bos><|turn>user\n{user_text}<turn|>\n{GENERATION_PROMPT}"


def chat_messages(messages) -> list[dict[str, str]]:
    """OpenAI-style chat messages -> [{"role", "content"}] with string content, or RequestError naming the
    message. Roles system/user/assistant ("developer" = system); content a string or a list of
    {"type": "text", "text": str} parts (joined with newlines). Images, audio and tool calls are refused."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"messages must be a non-empty list of {{role, content}} objects (got "
                           f"{type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}).")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with role and content (got {type(m).__name__}).")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in CHAT_ROLES:
            raise RequestError(f"{where}.role must be one of system, user, assistant, developer (got {role!r}); "
                               "tool messages are not supported.")
        for key in ("tool_calls", "function_call", "audio"):
            if m.get(key) is not None:
                raise RequestError(f"{where}.{key} is not supported (text chat only).")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RequestError(f"{where}.content[{j}] must be {{\"type\": \"text\", \"text\": string}} "
                                       f"(got {kind!r}); only text parts are supported.")
                texts.append(part["text"])
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string or a list of text parts "
                               f"(got {type(content).__name__}).")
        out.append({"role": role, "content": content})
    return out


def render_chat(messages, template: str | None = None, bos_token: str = "<bos>", eos_token: str = "<eos>") -> str:
    """The prompt text (starting with <bos>) for a conversation, ending with the non-thinking generation prompt.
    template: a checkpoint's jinja chat_template, rendered in jinja2's immutable sandbox (as transformers does);
    None: the Gemma-4 format of `chat_prompt` over every turn (assistant turns as "model", no thought channel)."""
    msgs = chat_messages(messages)
    if template is None:
        turns = "".join(f"<|turn>{'model' if m['role'] == 'assistant' else m['role']}\n{m['content']}<turn|>\n"
                        for m in msgs)
        return f"{bos_token}{turns}{GENERATION_PROMPT}"
    from jinja2 import TemplateError

    try:
        text = _compiled_template(template).render(messages=msgs, add_generation_prompt=True, bos_token=bos_token,
                                                eos_token=eos_token, enable_thinking=False)
    except TemplateError as e:
        raise CheckpointError(f"the checkpoint's chat_template failed to render ({type(e).__name__}: {e}).") from None
    return text if text.startswith(bos_token) else bos_token + text


def _raise_exception(message):
    raise RequestError(f"the chat template refused the messages: {message}")


@functools.lru_cache(maxsize=4)
def _compiled_template(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


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
        self._chat_template: tuple[str | None, str, str] | None = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token can stand for (the longest vocabulary entry as
        written, special tokens included): a text of N bytes has at least N / max_token_bytes tokens."""
        return max(len(t.encode("utf-8")) for t in self.tok.get_vocab(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Encode text in which special tokens (<bos>, <|turn>, ...) are written literally."""
        if not isinstance(text, str):
            raise RequestError(f"prompt must be text (got {type(text).__name__}).")
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_chat(self, user_text: str) -> list[int]:
        if not user_text or not user_text.strip():
            raise RequestError("prompt is empty; give some text to answer.")
        return self.encode(chat_prompt(user_text))

    def chat_template(self) -> tuple[str | None, str, str]:
        """(jinja chat_template or None, bos_token, eos_token) from tokenizer_config.json (or chat_template.jinja)
        next to tokenizer.json; read once."""
        if self._chat_template is None:
            cfg, d = {}, self.path.parent
            if (d / "tokenizer_config.json").exists():
                try:
                    cfg = json.loads((d / "tokenizer_config.json").read_text())
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{d}/tokenizer_config.json is not readable JSON ({e}).") from None
            t = cfg.get("chat_template")
            if isinstance(t, list):  # [{name, template}]: transformers' named templates
                t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
            if t is None and (d / "chat_template.jinja").exists():
                t = (d / "chat_template.jinja").read_text()

            def token(key, default):
                v = cfg.get(key, default)
                return v.get("content", default) if isinstance(v, dict) else v if isinstance(v, str) else default

            self._chat_template = (t if isinstance(t, str) else None, token("bos_token", "<bos>"),
                                   token("eos_token", "<eos>"))
        return self._chat_template

    def render_chat(self, messages) -> str:
        """Chat messages -> prompt text with this checkpoint's chat template (see `render_chat`)."""
        template, bos, eos = self.chat_template()
        return render_chat(messages, template, bos, eos)

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

"""OpenAI response objects from the model's events: whole answers (`text_completion`, `chat.completion`),
stream chunks (one per committed canvas; drafts and per-canvas statistics ride in the extension field
`dgemma`), logprobs in each endpoint's format, usage and finish_reason.

Usage: prompt_tokens is the model's num_input_tokens; completion_tokens adds up num_output_tokens over the
committed responses (each counts the tokens of its own text, the convention of Triton's own OpenAI frontend).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .params import Generation
from .triton import Event


@dataclass
class Answer:
    """Accumulates a request's events: text, tokens, statistics, finish reason."""

    gen: Generation
    model: str
    request_id: str
    token_text: callable  # token id -> its text (the checkpoint tokenizer)
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    counted: bool = False
    finish_reason: str | None = None
    stats: dict = field(default_factory=dict)
    logprob_items: list = field(default_factory=list)  # (token, logprob, [(token, logprob)]) per output token
    first_chunk: bool = True

    def add(self, ev: Event) -> None:
        if ev.draft:
            return
        self.text += ev.text
        if ev.num_input_tokens is not None and self.prompt_tokens is None:
            self.prompt_tokens = ev.num_input_tokens
        if ev.num_output_tokens is not None:
            self.completion_tokens += ev.num_output_tokens
            self.counted = True
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
        if ev.canvases:
            self.stats = {"canvases": ev.canvases, "steps_per_canvas": ev.steps_per_canvas,
                          "tokens_per_forward": round(ev.tokens_per_forward, 4), "seed": self.gen.seed}

    # -- logprobs -------------------------------------------------------------------------------------------------
    def _items(self, ev: Event) -> list:
        if self.gen.logprobs is None or ev.token_ids is None or ev.logprobs is None:
            return []
        ids, lps = ev.token_ids.reshape(-1).tolist(), ev.logprobs.reshape(-1).tolist()
        k = self.gen.logprobs
        tops = [[] for _ in ids]
        if k and ev.top_ids is not None and ev.top_logprobs is not None:
            ti, tl = ev.top_ids.reshape(len(ids), -1), ev.top_logprobs.reshape(len(ids), -1)
            tops = [sorted(((self.token_text(int(a)), _finite(b)) for a, b in zip(ti[i][:k], tl[i][:k])),
                           key=lambda x: -x[1]) for i in range(len(ids))]  # most likely first, as OpenAI lists them
        return [(self.token_text(int(t)), _finite(lp), top) for t, lp, top in zip(ids, lps, tops)]

    def _logprobs(self, items: list, offset: int):
        if self.gen.logprobs is None:
            return None
        if self.gen.kind == "chat":
            def entry(tok, lp):
                return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                                for t, lp, top in items], "refusal": None}
        offsets, pos = [], offset
        for t, _, _ in items:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": [t for t, _, _ in items], "token_logprobs": [lp for _, lp, _ in items],
                "top_logprobs": [dict(top) for _, _, top in items], "text_offset": offsets}

    # -- objects -----------------------------------------------------------------------------------------------------
    def usage(self) -> dict | None:
        if self.prompt_tokens is None or not self.counted:
            return None
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _head(self, obj: str) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, events: list[Event]) -> dict:
        """The non-streamed answer from all its events."""
        items = []
        for ev in events:
            self.add(ev)
            items += self._items(ev) if not ev.draft else []
        fr = self.finish_reason or "stop"  # a model without the finish_reason output (older repository)
        lp = self._logprobs(items, 0)
        if self.gen.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text, "refusal": None},
                      "logprobs": lp, "finish_reason": fr}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": self.text, "logprobs": lp, "finish_reason": fr}
            out = self._head("text_completion")
        return {**out, "choices": [choice], "usage": self.usage(), "dgemma": self.stats}

    def chunk(self, ev: Event) -> dict | None:
        """The stream chunk for one event (None for the closing statistics response without text)."""
        if ev.draft:
            ext = {"draft": {"canvas_index": ev.canvas_index, "step": (ev.steps_per_canvas or [0])[-1],
                             "text": ev.text}}
            return self._chunk(None, None, None, ext)  # an empty delta: plain clients see no text
        offset = len(self.text)
        self.add(ev)
        if not ev.committed and not ev.text:
            return None
        ext = {"canvas_index": ev.canvas_index, "steps": (ev.steps_per_canvas or [0])[-1]}
        return self._chunk(ev.text, self._logprobs(self._items(ev), offset), None, ext)

    def final_chunks(self) -> list[dict]:
        """The finish_reason chunk (with the request's statistics) and, with include_usage, the usage chunk."""
        out = [self._chunk(None, None, self.finish_reason or "stop", self.stats)]
        if self.gen.include_usage:
            obj = "chat.completion.chunk" if self.gen.kind == "chat" else "text_completion"
            out.append({**self._head(obj), "choices": [], "usage": self.usage()})
        return out

    def _chunk(self, text: str | None, logprobs, finish_reason, ext: dict | None) -> dict:
        if self.gen.kind == "chat":
            delta = {} if text is None else {"content": text}
            if self.first_chunk:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            out = self._head("text_completion")
        self.first_chunk = False
        out["choices"] = [choice]
        if self.gen.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last when usage is requested
        if ext:
            out["dgemma"] = ext
        return out


def _finite(x) -> float:
    """JSON has no -Infinity: a log-probability of an impossible token is written as -9999.0 (as vLLM does)."""
    x = float(x)
    return x if math.isfinite(x) else -9999.0

"""tokens.render_chat: the embedded tiny model's chat template renders one user turn exactly as chat_prompt (so
the tiny model still sorts through chat), the template and the built-in Gemma-4 format agree on whole
conversations, and malformed messages are refused naming the message."""

from __future__ import annotations

import json

import pytest

from dgemma.core.errors import CheckpointError, RequestError
from dgemma.tiny import DEFAULT_CHECKPOINT
from dgemma.model.tokens import Tokenizer, chat_prompt, render_chat

TOK = Tokenizer(DEFAULT_CHECKPOINT)
CONVERSATION = [{"role": "system", "content": "You sort digits."}, {"role": "user", "content": "sort: 2 1"},
                {"role": "assistant", "content": "1 2"},
                {"role": "user", "content": [{"type": "text", "text": "sort: 9"}, {"type": "text", "text": "8"}]}]


def test_tiny_template_renders_one_user_turn_as_chat_prompt():
    assert TOK.chat_template()[0] is not None  # the tiny checkpoint ships tokenizer_config.json
    for text in ("sort: 3 1 4 1 5 9 2 6 5 3", "héllo\nworld", ""):
        assert TOK.render_chat([{"role": "user", "content": text}]) == chat_prompt(text)
        assert render_chat([{"role": "user", "content": text}]) == chat_prompt(text)


def test_template_and_builtin_format_agree_on_a_conversation():
    text = TOK.render_chat(CONVERSATION)
    assert text == render_chat(CONVERSATION)
    assert text == ("<bos><|turn>system\nYou sort digits.<turn|>\n<|turn>user\nsort: 2 1<turn|>\n<|turn>model\n1 2"
                    "<turn|>\n<|turn>user\nsort: 9\n8<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    assert render_chat([{"role": "developer", "content": "x"}]).startswith("<bos><|turn>system\nx<turn|>")


@pytest.mark.parametrize("messages, pattern", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    (["hi"], r"messages\[0\] must be an object"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\]\.role"),
    ([{"role": "user"}], r"messages\[0\]\.content must be"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"content\[0\]"),
    ([{"role": "assistant", "content": "x", "tool_calls": [{}]}], "tool_calls is not supported"),
])
def test_malformed_messages_are_refused(messages, pattern):
    with pytest.raises(RequestError, match=pattern):
        TOK.render_chat(messages)


def test_checkpoint_template_runs_sandboxed(tmp_path):
    (tmp_path / "tokenizer.json").write_text((DEFAULT_CHECKPOINT / "tokenizer.json").read_text())
    cfg = {"chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="SecurityError"):
        Tokenizer(tmp_path).render_chat([{"role": "user", "content": "x"}])
    cfg = {"chat_template": "{{ raise_exception('only one turn') }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RequestError, match="only one turn"):
        Tokenizer(tmp_path).render_chat([{"role": "user", "content": "x"}])
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer(tmp_path).render_chat([{"role": "user", "content": "x"}]) == "<bos>x!"

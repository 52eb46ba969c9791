"""OpenAI features that rest on the `dgemma` model's side of the contract: prompts that start with <bos> taken as
fully rendered, `stop_words`, `return_logprobs` / `top_logprobs` (output_token_ids, output_logprobs,
output_top_logprob_ids, output_top_logprobs), `return_num_input_tokens` / `return_num_output_tokens`, `finish_reason` and the
OpenAI-style `temperature` (t_max = T, t_min = T * default_t_min / default_t_max).

The module skips, naming what is missing, while the served model lacks those inputs/outputs (a repository
rendered before the model gained them)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from .rawgrpc import send

openai = pytest.importorskip("openai", reason="install the serving extra: pip install -e '.[serve]'")

SORT, SORTED = "sort: 3 1 4 1 5 9 2 6 5 3", "1 1 2 3 3 4 5 5 6 9"
NEW_INPUTS = {"stop_words", "return_logprobs", "top_logprobs", "return_num_input_tokens", "return_num_output_tokens",
              "temperature"}
NEW_OUTPUTS = {"output_token_ids", "output_logprobs", "output_top_logprob_ids", "output_top_logprobs", "num_input_tokens",
               "num_output_tokens", "finish_reason"}


@pytest.fixture(scope="module")
def client(triton):
    import tritonclient.grpc as grpcclient

    md = grpcclient.InferenceServerClient(triton.grpc_url).get_model_metadata("dgemma", as_json=True)
    missing = sorted(NEW_INPUTS - {i["name"] for i in md["inputs"]}) + sorted(
        NEW_OUTPUTS - {o["name"] for o in md["outputs"]})
    if missing:
        pytest.skip(f"the dgemma model lacks the contract's {', '.join(missing)} (model side not landed)")
    from dgemma.serving.openai_api import start_in_thread

    run = start_in_thread(triton.grpc_url)
    yield openai.OpenAI(base_url=run.base_url, api_key="unused", max_retries=0, timeout=60)
    run.stop()


@pytest.fixture(scope="module")
def tok():
    from dgemma.tiny import DEFAULT_CHECKPOINT
    from dgemma.model.tokens import Tokenizer

    return Tokenizer(DEFAULT_CHECKPOINT)


def chat(client, content=SORT, **kw):
    return client.chat.completions.create(model="dgemma", messages=[{"role": "user", "content": content}], **kw)


def test_chat_and_completion_sort_through_rendered_prompts(client, tok):
    """The server renders the chat itself and sends <bos>...: the tiny model sorts exactly as through
    `dgemma client` (the model took the prompt as is, not wrapped a second time)."""
    assert chat(client, seed=0).choices[0].message.content == SORTED
    prompt = tok.render_chat([{"role": "user", "content": SORT}]).removeprefix("<bos>")
    r = client.completions.create(model="dgemma", prompt=prompt, seed=0)
    assert r.choices[0].text == SORTED and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": SORT}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "2 1"}, {"role": "assistant", "content": "1 2"},
     {"role": "user", "content": [{"type": "text", "text": "9 8"}]}],  # 63 tokens: the cpu profile takes 64
])
def test_chat_equals_direct_grpc_of_the_rendered_prompt(client, triton, tok, messages):
    from dgemma.serving.client import request

    r = client.chat.completions.create(model="dgemma", messages=messages, seed=5, max_completion_tokens=32)
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant"
    prompt = tok.render_chat(messages)
    assert msg.content == request(triton.grpc_url, prompt, seed=5, max_tokens=32)[-1]["text_output"]


def test_chat_streams_one_chunk_per_committed_canvas(client):
    kw = dict(seed=1, max_tokens=96, extra_body={"ignore_eos": True})
    whole = chat(client, **kw).choices[0].message.content
    chunks = list(chat(client, stream=True, **kw))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content is not None]
    assert [c.dgemma["canvas_index"] for c in content] == [0, 1, 2]
    assert "".join(c.choices[0].delta.content for c in content) == whole
    assert content[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_cuts_the_text_and_finishes_with_stop(client):
    r = chat(client, seed=0, stop=[" 5", "never"])
    assert r.choices[0].message.content == "1 1 2 3 3 4" and r.choices[0].finish_reason == "stop"
    chunks = list(chat(client, seed=0, stop=" 5", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "1 1 2 3 3 4"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chat(client, seed=0, stop=["x"]).choices[0].message.content == SORTED  # no stop sequence in the text


def test_finish_reason_length_when_max_tokens_runs_out(client):
    r = client.completions.create(model="dgemma", prompt="tell me a story", seed=0, max_tokens=32,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert chat(client, seed=0).choices[0].finish_reason == "stop"  # EOS


def assert_logprob(x):
    assert isinstance(x, float) and math.isfinite(x) and x <= 0


def test_completion_logprobs_shapes_and_values(client, tok):
    prompt = tok.render_chat([{"role": "user", "content": SORT}]).removeprefix("<bos>")  # a clean digits answer
    r = client.completions.create(model="dgemma", prompt=prompt, seed=0, logprobs=3)
    assert r.choices[0].text == SORTED
    lp = r.choices[0].logprobs
    n = len(lp.tokens)
    assert n > 0 and len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text  # byte-level tiny tokenizer: tokens spell the text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert_logprob(chosen)
        assert len(top) == 3
        for v in top.values():
            assert_logprob(v)
        assert max(top.values()) >= chosen - 1e-4  # the top-1 is at least as likely as the chosen token
    none = client.completions.create(model="dgemma", prompt=prompt, seed=0, logprobs=0).choices[0].logprobs
    assert none.token_logprobs == lp.token_logprobs and all(t == {} for t in none.top_logprobs)
    streamed = list(client.completions.create(model="dgemma", prompt=prompt, seed=0, logprobs=3, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_chat_logprobs_shapes_and_values(client):
    r = chat(client, seed=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert_logprob(c.logprob)
        assert c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        for t in c.top_logprobs:
            assert_logprob(t.logprob)
    assert chat(client, seed=0).choices[0].logprobs is None


def test_usage_counts_the_rendered_prompt(client, tok):
    messages = [{"role": "system", "content": "Sort."}, {"role": "user", "content": "sort: 3 1 4"}]
    r = client.chat.completions.create(model="dgemma", messages=messages, seed=0)
    assert r.usage.prompt_tokens == len(tok.encode(tok.render_chat(messages)))
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    c = client.completions.create(model="dgemma", prompt="sort: 3 1 4", seed=0)
    assert c.usage.prompt_tokens == len(tok.encode("<bos>sort: 3 1 4"))
    chunks = list(client.chat.completions.create(model="dgemma", messages=messages, seed=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage
    assert all(ch.usage is None for ch in chunks[:-1])


def test_temperature_maps_onto_the_schedule(client):
    """T = 0.8 is the checkpoint's default 0.4..0.8 schedule: the same answer as no temperature at all."""
    kw = dict(prompt="tell me a story", max_tokens=32, extra_body={"ignore_eos": True})
    for seed in (0, 1):
        default = client.completions.create(model="dgemma", seed=seed, **kw).choices[0].text
        assert client.completions.create(model="dgemma", seed=seed, temperature=0.8, **kw).choices[0].text == default
    hot = client.completions.create(model="dgemma", seed=0, temperature=2.0, **kw).choices[0].text
    assert isinstance(hot, str)
    assert client.completions.create(model="dgemma", seed=0, temperature=0, **kw).choices[0].finish_reason


def frontend_request(url: str, prompt: str, stream: bool, **extra) -> list:
    """The request Triton's own OpenAI frontend builds for a non-vLLM model (triton-inference-server/server,
    python/openai/openai_frontend/engine/utils/triton.py, _create_trtllm_generate_request): every tensor [1, 1]
    with the batch dim, stop_words [1, n], seed uint64, the token counts asked for; sent here over gRPC with the
    same shapes and dtypes (the frontend hands them to the in-process server API). -> the raw responses."""
    tensors = {"text_input": np.array([[prompt.encode()]], dtype=np.object_),
               "stream": np.bool_([[stream]]), "max_tokens": np.int32([[extra.pop("max_tokens", 32)]]),
               "return_num_input_tokens": np.bool_([[True]]), "return_num_output_tokens": np.bool_([[True]]),
               "exclude_input_in_output": np.bool_([[True]])}
    if "stop" in extra:
        tensors["stop_words"] = np.array([[s.encode() for s in extra.pop("stop")]], dtype=np.object_)
    for name in ("top_p", "frequency_penalty", "presence_penalty", "temperature"):
        if name in extra:
            tensors[name] = np.float32([[extra.pop(name)]])
    if "seed" in extra:
        tensors["seed"] = np.uint64([[extra.pop("seed")]])
    assert not extra, extra
    out = send(url, tensors)
    assert not isinstance(out, str), out
    return out


def _text(result) -> str:
    a = result.as_numpy("text_output")
    assert a.size == 1  # the frontend reads exactly one string (_to_string)
    return a.reshape(-1)[0].decode()


def _count(result, name) -> int:
    a = result.as_numpy(name)
    assert a.dtype == np.uint32 and a.size == 1  # read as one UINT32 (_get_usage_from_response)
    return int(a.reshape(-1)[0])


def test_tritons_openai_frontend_requests_are_answered(triton, tok):
    """What a user who runs Triton's OpenAI frontend against our repository gets: the chat template rendered by the
    frontend (transformers' apply_chat_template on the checkpoint's tokenizer_config.json: the same text as ours),
    then the request shapes above. Non-streaming: one response with the text and usage, then the final flag (the
    frontend accepts 1 or 2 responses); streaming: per-canvas pieces whose num_output_tokens add up to the whole."""
    from transformers import AutoTokenizer

    from dgemma.serving.client import request
    from dgemma.tiny import DEFAULT_CHECKPOINT

    messages = [{"role": "user", "content": SORT}]
    prompt = AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert prompt == tok.render_chat(messages)
    kw = dict(seed=2**63 + 5, temperature=0.8, top_p=1.0, frequency_penalty=0.0, presence_penalty=0.0,
              max_tokens=64)
    whole = frontend_request(triton.grpc_url, prompt, False, **kw)
    assert len(whole) == 2 and not whole[1].get_response().outputs
    text = _text(whole[0])
    assert text == request(triton.grpc_url, prompt, seed=2**63 + 5, max_tokens=64)[-1]["text_output"]
    assert text == SORTED
    n_in, n_out = _count(whole[0], "num_input_tokens"), _count(whole[0], "num_output_tokens")
    assert n_in == len(tok.encode(prompt)) and n_out == len(tok.encode(text))  # the EOS and pads not counted
    pieces = [r for r in frontend_request(triton.grpc_url, prompt, True, **kw) if r.get_response().outputs]
    assert "".join(_text(r) for r in pieces) == text
    assert sum(_count(r, "num_output_tokens") for r in pieces) == n_out
    assert {_count(r, "num_input_tokens") for r in pieces} == {n_in}
    cut = frontend_request(triton.grpc_url, prompt, False, stop=["5 6"], **kw)
    assert _text(cut[0]) == SORTED[: SORTED.index("5 6")]

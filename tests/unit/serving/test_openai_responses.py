"""The OpenAI door without Triton: model responses with the contract's outputs (token ids, log-probabilities,
top-k, token counts, finish_reason) decoded from gRPC protobufs and turned into completion / chat objects and
stream chunks; requests encoded from the model's metadata; refusals of inputs an older model lacks."""

from __future__ import annotations

import struct

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="install the serving extra: pip install -e '.[serve]'")

from dgemma.serving.openai_api import params  # noqa: E402
from dgemma.serving.openai_api.errors import ApiError  # noqa: E402
from dgemma.serving.openai_api.responses import Answer  # noqa: E402
from dgemma.serving.openai_api.triton import Event, ModelInfo, TritonBridge, _decode  # noqa: E402

TOKENS = {10: "1", 11: " ", 12: "2", 13: "3"}


def infer_response(**outputs):
    """A ModelInferResponse holding `outputs` (name -> (datatype, numpy array)) as raw contents."""
    from tritonclient.grpc import service_pb2 as pb

    ir = pb.ModelInferResponse(model_name="dgemma")
    for name, (dtype, a) in outputs.items():
        o = ir.outputs.add()
        o.name, o.datatype = name, dtype
        o.shape.extend(a.shape)
        if dtype == "BYTES":
            ir.raw_output_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in a.reshape(-1)))
        else:
            ir.raw_output_contents.append(np.ascontiguousarray(a).tobytes())
    return ir


def contract_response():
    return infer_response(
        text_output=("BYTES", np.array([b"1 2"], dtype=object)), canvas_index=("INT32", np.array([0], np.int32)),
        canvases=("INT32", np.array([1], np.int32)), steps_per_canvas=("INT32", np.array([4], np.int32)),
        tokens_per_forward=("FP32", np.array([8.0], np.float32)), is_draft=("BOOL", np.array([False])),
        output_token_ids=("INT64", np.array([10, 11, 12], np.int64)),
        output_logprobs=("FP32", np.array([-0.1, -0.2, -np.inf], np.float32)),
        output_top_logprob_ids=("INT64", np.array([[10, 13], [11, 10], [13, 12]], np.int64)),
        output_top_logprobs=("FP32", np.array([[-0.1, -3.0], [-0.2, -2.0], [-0.05, -9.0]], np.float32)),
        num_input_tokens=("UINT32", np.array([30], np.uint32)), num_output_tokens=("UINT32", np.array([3], np.uint32)),
        finish_reason=("BYTES", np.array([b"length"], dtype=object)))


def test_decode_reads_the_contract_outputs():
    ev = _decode(contract_response())
    assert (ev.text, ev.canvas_index, ev.canvases, ev.steps_per_canvas, ev.draft) == ("1 2", 0, 1, [4], False)
    assert ev.committed and ev.token_ids.tolist() == [10, 11, 12] and ev.top_ids.shape == (3, 2)
    assert (ev.num_input_tokens, ev.num_output_tokens, ev.finish_reason) == (30, 3, "length")


def answer(kind, k=None, stream=False, include_usage=False):
    gen = params.Generation(kind, "<bos>x", {}, stream=stream, include_usage=include_usage, logprobs=k, seed=7)
    return Answer(gen, "dgemma", "id-1", TOKENS.get)


def test_completion_and_chat_logprobs():
    ev = _decode(contract_response())
    c = answer("completion", k=2).whole([ev])
    lp = c["choices"][0]["logprobs"]
    assert lp["tokens"] == ["1", " ", "2"] and lp["text_offset"] == [0, 1, 2]
    assert lp["token_logprobs"] == pytest.approx([-0.1, -0.2, -9999.0])  # -inf is not JSON
    assert lp["top_logprobs"][0] == {"1": pytest.approx(-0.1), "3": pytest.approx(-3.0)}
    assert c["choices"][0]["finish_reason"] == "length" and c["dgemma"]["seed"] == 7
    assert c["usage"] == {"prompt_tokens": 30, "completion_tokens": 3, "total_tokens": 33}
    ch = answer("chat", k=1).whole([ev])
    content = ch["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["1", " ", "2"] and content[0]["bytes"] == [ord("1")]
    assert content[2]["top_logprobs"] == [{"token": "3", "logprob": pytest.approx(-0.05), "bytes": [ord("3")]}]
    assert answer("chat").whole([ev])["choices"][0]["logprobs"] is None


def test_stream_chunks_per_canvas_then_finish_and_usage():
    a = answer("chat", stream=True, include_usage=True)
    canvases = [Event("1 2", 0, 1, [3], num_input_tokens=30, num_output_tokens=3),
                Event(" 3", 1, 2, [3, 5], num_input_tokens=30, num_output_tokens=2)]
    draft = Event("1 ?", 1, 1, [3, 1], draft=True)
    stats = Event("", 2, 2, [3, 5], 2.5, num_input_tokens=30, num_output_tokens=0, finish_reason="stop")
    chunks = [a.chunk(e) for e in (canvases[0], draft, canvases[1], stats)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "1 2"}
    assert chunks[1]["choices"][0]["delta"] == {} and chunks[1]["dgemma"]["draft"] == {"canvas_index": 1, "step": 1,
                                                                                       "text": "1 ?"}
    assert chunks[2]["choices"][0]["delta"] == {"content": " 3"} and chunks[2]["dgemma"]["canvas_index"] == 1
    assert chunks[3] is None and all(c["usage"] is None for c in chunks if c)
    finish, usage = a.final_chunks()
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["dgemma"]["steps_per_canvas"] == [3, 5]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 30, "completion_tokens": 5,
                                                         "total_tokens": 35}
    assert a.text == "1 2 3"


def test_request_is_typed_from_the_model_metadata():
    b = TritonBridge("127.0.0.1:1")
    b.info = ModelInfo("dgemma", {"text_input": "BYTES", "stop_words": "BYTES", "max_tokens": "INT32",
                                  "seed": "UINT64", "temperature": "FP32", "stream": "BOOL"}, {})
    req = b._request("<bos>hi", {"stop_words": ["a", "bc"], "max_tokens": 5, "seed": 2**40, "temperature": 0.5,
                                 "stream": True}, "r1")
    shapes = {t.name: (t.datatype, list(t.shape)) for t in req.inputs}
    # the model's max_batch_size 1: a leading batch dim, as Triton's own OpenAI frontend sends
    assert shapes["stop_words"] == ("BYTES", [1, 2]) and shapes["seed"] == ("UINT64", [1, 1])
    raw = dict(zip([t.name for t in req.inputs], req.raw_input_contents))
    assert raw["stop_words"] == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"
    assert np.frombuffer(raw["seed"], np.uint64)[0] == 2**40 and np.frombuffer(raw["stream"], np.bool_)[0]
    assert req.parameters["triton_enable_empty_final_response"].bool_param and req.id == "r1"


def test_inputs_an_older_model_lacks():
    gen = params.completion({"model": "dgemma", "prompt": "x", "stop": "\n", "seed": 1}, "dgemma")
    declared = {"text_input", "seed", "stream", "max_tokens"}
    with pytest.raises(ApiError) as e:
        params.model_inputs(gen, declared)
    assert e.value.status == 400 and e.value.param == "stop" and "stop_words" in e.value.message
    gen = params.completion({"model": "dgemma", "prompt": "x", "seed": 1}, "dgemma")
    sent = params.model_inputs(gen, declared)  # token-count requests are dropped: the answer has no usage then
    assert sent == {"seed": 1, "stream": False} and gen.prompt == "<bos>x"

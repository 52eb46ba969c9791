"""Request parsing and repository rendering for Triton, without Triton: every RequestError message has a test."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dgemma.core.errors import RequestError
from dgemma.core.profiles import PROFILES
from dgemma.core.contract import MODEL_INPUTS as INPUTS
from dgemma.core.contract import MODEL_OUTPUTS as OUTPUTS
from dgemma.serving.request import Limits, Request, parse_request
from dgemma.tiny import DEFAULT_CHECKPOINT
from dgemma.model.tokens import Tokenizer

LIMITS = Limits(target="cpu/bf16", max_prompt=64, max_context=256, canvas_length=32, max_denoising_steps=48,
                default_max_tokens=32, default_entropy_bound=0.1)
TOK = Tokenizer(DEFAULT_CHECKPOINT)
PROMPT = "sort: 3 1 4 1 5 9 2 6 5 3"


def parse(**kw):
    inputs = {k: np.array([v.encode() if isinstance(v, str) else v]) for k, v in kw.items()}
    return parse_request(inputs, LIMITS, TOK)


def test_defaults_and_roundtrip():
    r = parse(text_input=PROMPT)
    assert list(r.input_ids) == TOK.encode_chat(PROMPT)
    assert (r.max_tokens, r.seed, r.stream, r.max_denoising_steps, r.entropy_bound, r.ignore_eos, r.infill) == \
        (32, 0, False, 48, 0.1, False, None)
    assert (r.t_min, r.t_max, r.adaptive_stopping, r.stream_drafts) == (0.4, 0.8, True, False)
    r3 = parse(text_input=PROMPT, temperature_min=np.float32(0.25), temperature_max=np.float32(1.5),
               adaptive_stopping=False, stream_drafts=True, exclude_input_in_output=True)
    assert (r3.t_min, r3.t_max, r3.adaptive_stopping, r3.stream_drafts) == (0.25, 1.5, False, True)
    r2 = parse(text_input=PROMPT, max_tokens=np.int32(96), seed=np.uint64(7), stream=True, max_denoising_steps=np.int32(5),
               entropy_bound=np.float32(0.5), ignore_eos=True, infill="0 1 _ _", top_logprobs=np.int32(3),
               return_num_input_tokens=True, top_p=np.float32(1), frequency_penalty=np.float32(0))
    assert Request.from_json(r2.to_json()) == r2
    assert (r2.max_tokens, r2.seed, r2.stream, r2.max_denoising_steps, r2.ignore_eos) == (96, 7, True, 5, True)
    assert (r2.logprobs, r2.return_num_input_tokens, r2.return_num_output_tokens) == (3, True, False)
    assert parse(text_input=PROMPT, return_logprobs=True).logprobs == 0 and r3.logprobs is None
    assert parse(text_input=PROMPT, seed=np.uint64(2**64 - 1)).seed == 2**64 - 1


@pytest.mark.parametrize("kw, pattern", [
    (dict(text_input=""), r"text_input is empty \(got ''\)"),
    (dict(text_input="   "), r"text_input is empty"),
    (dict(text_input="sort: " + " ".join("7" * 40)), r"prompt has \d+ tokens; cpu/bf16 holds at most 64 prompt "
                                                    r"tokens \(GpuProfile.max_prompt\)"),
    (dict(text_input=PROMPT, max_tokens=np.int32(0)), r"max_tokens must be an integer >= 1 \(got 0\); output comes "
                                                      r"in whole 32-token canvases"),
    (dict(text_input=PROMPT, max_tokens=np.int32(-5)), r"max_tokens must be an integer >= 1 \(got -5\)"),
    (dict(text_input=PROMPT, max_tokens=np.int32(1000)), r"max_tokens=1000 needs 32 canvas\(es\) of 32: prompt 51 \+ "
                                                         r"1024 = 1075 tokens; cpu/bf16 holds at most 256 prompt\+output "
                                                         r"tokens \(GpuProfile.max_context\). Use max_tokens <= 192"),
    (dict(text_input=PROMPT, seed=np.int64(-1)), r"seed must be an integer in 0\.\.\d+ \(got -1\)"),
    (dict(text_input=PROMPT, max_denoising_steps=np.int32(0)), r"max_denoising_steps must be an integer in 1\.\.48 "
                                                                r"\(got 0\); the checkpoint's generation_config"),
    (dict(text_input=PROMPT, max_denoising_steps=np.int32(49)), r"in 1\.\.48 \(got 49\)"),
    (dict(text_input=PROMPT, entropy_bound=np.float32(0)), r"entropy_bound must be a finite number > 0 \(got 0\.0\)"),
    (dict(text_input=PROMPT, entropy_bound=np.float32("nan")), r"entropy_bound must be a finite number > 0 \(got nan\)"),
    (dict(text_input=PROMPT, infill="no holes"), r"infill must be a canvas template with at least one '_' hole"),
    (dict(text_input=PROMPT, top_k=np.int32(1)), r"unknown input\(s\) 'top_k'; accepted: text_input"),
    (dict(text_input=PROMPT, temperature=np.float32(2.5)), r"temperature must be a finite number >= 0 and <= 2 "
                                                           r"\(got 2\.5\) \(the OpenAI range\)"),
    (dict(text_input=PROMPT, temperature=np.float32(0.5), temperature_max=np.float32(0.9)),
     r"either temperature \(OpenAI style\) or temperature_min/temperature_max, not both"),
    (dict(text_input=PROMPT, temperature_min=np.float32(0), temperature_max=np.float32(1e-45)),
     r"temperature_max must be a finite number >= 0\.01 \(got 1\.4\d*e-45\); below 0\.01 the scaled logits "
     r"overflow"),
    (dict(text_input=PROMPT, top_p=np.float32(0.9)), r"top_p=0\.9 is not supported by DiffusionGemma's canvas sampler"),
    (dict(text_input=PROMPT, presence_penalty=np.float32(1)), r"presence_penalty=1 is not supported"),
    (dict(text_input=PROMPT, top_logprobs=np.int32(6)), r"top_logprobs must be an integer in 0\.\.5 \(got 6\)"),
    (dict(text_input=PROMPT, max_tokens=np.int32(32), infill="0 1" + " _" * 40),
     r"infill template has 83 tokens, past the 1 canvas\(es\) of 32 that max_tokens=32 gives"),
    (dict(text_input=PROMPT, temperature_min=np.float32(0.9)), r"temperature_min < temperature_max \(got 0\.9\d* and "
                                                               r"0\.8; the checkpoint's defaults are 0\.4 and 0\.8"),
    (dict(text_input=PROMPT, temperature_max=np.float32("inf")), r"temperature_max must be a finite number >= 0\.01 "
                                                                  r"\(got inf\)"),
    (dict(text_input=PROMPT, temperature_min=np.float32(-1)), r"temperature_min must be a finite number >= 0"),
])
def test_request_errors_name_value_and_limit(kw, pattern):
    with pytest.raises(RequestError, match=pattern):
        parse(**kw)


def test_openai_temperature_maps_onto_the_range_and_a_rendered_prompt_is_taken_as_is():
    """temperature T -> (T * 0.4 / 0.8, T): 0.8 is the checkpoint's own schedule; below 0.01 it is clamped."""
    r = parse(text_input=PROMPT, temperature=np.float32(0.8))
    assert (r.t_min, r.t_max) == pytest.approx((0.4, 0.8))
    assert (parse(text_input=PROMPT, temperature=np.float32(1.5)).t_min) == pytest.approx(0.75)
    assert (parse(text_input=PROMPT, temperature=np.float32(0)).t_max) == pytest.approx(0.01)
    rendered = TOK.render_chat([{"role": "user", "content": PROMPT}])
    assert rendered.startswith("<bos>") and list(parse(text_input=rendered).input_ids) == TOK.encode_chat(PROMPT)


def test_stop_words_and_utf8_are_checked():
    inputs = {"text_input": np.array([PROMPT.encode()], dtype=object),
              "stop_words": np.array([[b"5", b"6 9"]], dtype=object)}
    assert parse_request(inputs, LIMITS, TOK).stop_words == ("5", "6 9")
    for bad, pattern in [(b"\xff\xfe", r"not valid UTF-8: byte 0xff at offset 0"),
                         (b"\xed\xa0\x80", r"not valid UTF-8: byte 0xed"),  # an encoded surrogate
                         (b"\xc0\x80", r"not valid UTF-8: byte 0xc0")]:  # an overlong NUL
        with pytest.raises(RequestError, match=pattern):
            parse(text_input=bad)
        with pytest.raises(RequestError, match="infill is not valid UTF-8"):
            parse(text_input=PROMPT, infill=b"_ " + bad)
    with pytest.raises(RequestError, match=r"stop_words holds 17 sequences; at most 16"):
        parse_request({**inputs, "stop_words": np.array([[b"x"] * 17], dtype=object)}, LIMITS, TOK)
    with pytest.raises(RequestError, match=r"each stop word must be 1\.\.256 bytes"):
        parse_request({**inputs, "stop_words": np.array([[b""]], dtype=object)}, LIMITS, TOK)


def test_huge_prompt_refused_by_its_byte_length_before_tokenizing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tokenized")

    monkeypatch.setattr(TOK, "encode_chat", boom)
    monkeypatch.setattr(TOK, "encode", boom)
    with pytest.raises(RequestError, match=r"text_input has 10000000 bytes; cpu/bf16 holds at most 64 prompt tokens .* "
                                           r"no token is longer than 16 bytes, so at most 1280 bytes can fit"):
        parse(text_input=b"x" * 10_000_000)


def test_two_values_in_one_input_refused():
    with pytest.raises(RequestError, match=r"max_tokens must hold exactly one value \(got 2"):
        parse_request({"text_input": np.array([PROMPT.encode()]), "max_tokens": np.array([1, 2], dtype=np.int32)},
                      LIMITS, TOK)


def test_limits_from_parameters():
    p = {"target": "cpu/bf16", "max_prompt": "64", "max_context": "256", "canvas_length": "32",
         "max_denoising_steps": "48", "default_max_tokens": "32", "default_entropy_bound": "0.1",
         "default_t_min": "0.4", "default_t_max": "0.8"}
    assert Limits.from_parameters(p) == LIMITS
    with pytest.raises(RequestError, match=r"model config lacks parameter 'max_prompt'; re-render with `make repo`"):
        Limits.from_parameters({k: v for k, v in p.items() if k != "max_prompt"})


@pytest.mark.parametrize("gpu", sorted(PROFILES))
def test_render_every_profile(tmp_path, gpu):
    from dgemma.core.profiles import _hardware_rule, Precision
    from dgemma.serving.render import MODELS, render

    for p in PROFILES[gpu].precisions:
        if _hardware_rule(PROFILES[gpu], Precision(p)):
            continue
        root = render(gpu, p.value, out=tmp_path / p.value, backends=False, backend="bls")
        for m in MODELS:
            text = (root / "models" / m / "config.pbtxt").read_text()
            assert "${" not in text and f'name: "{m}"' in text
        top = (root / "models" / "dgemma" / "config.pbtxt").read_text()
        assert "model_transaction_policy { decoupled: true }" in top and 'backend: "python"' in top
        assert "max_batch_size: 1\n" in top and "dynamic_batching" not in top  # the model batches in flight itself
        assert '{ name: "seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true }' in top
        assert '{ name: "stop_words" data_type: TYPE_STRING dims: [ -1 ] optional: true }' in top
        assert '{ name: "output_top_logprob_ids" data_type: TYPE_INT64 dims: [ -1, -1 ] }' in top
        assert f'key: "prefill_chunk" value: {{ string_value: "{2 * 32}" }}' in top
        assert _io_names(top, "input") == list(INPUTS) and _io_names(top, "output") == list(OUTPUTS)
        assert f'key: "max_prompt" value: {{ string_value: "{PROFILES[gpu].max_prompt}" }}' in top
        assert f'key: "max_batch" value: {{ string_value: "{PROFILES[gpu].max_batch}" }}' in top
        assert re.search(r'key: "target" value: \{ string_value: "' + gpu + "/" + p.value, top)
        assert (root / "models" / "dgemma" / "1" / "model.py").exists()


def test_render_missing_key_is_an_error(tmp_path):
    from dgemma.core.layout import TRITON_TEMPLATES as TEMPLATES
    from dgemma.serving.render import TEMPLATE_DIRS, render

    tdir = tmp_path / "tmpl"
    for m in TEMPLATE_DIRS:
        (tdir / m / "1").mkdir(parents=True)
        (tdir / m / "config.pbtxt.tmpl").write_text((TEMPLATES / m / "config.pbtxt.tmpl").read_text())
    (tdir / "dgemma" / "config.pbtxt.tmpl").write_text('name: "dgemma"\n${no_such_key}\n')
    with pytest.raises(KeyError, match="no_such_key"):
        render("cpu", "bf16", out=tmp_path / "out", templates=tdir, backends=False)


def test_model_py_has_no_sampling_arithmetic():
    from dgemma.core.layout import TRITON_TEMPLATES as TEMPLATES

    src = (TEMPLATES / "dgemma" / "1" / "model.py").read_text()
    assert "import torch" not in src and "multinomial" not in src and "dgemma.serving.loop" in src


def _io_names(text: str, block: str) -> list[str]:
    body = text.split(f"\n{block} [\n", 1)[1].split("\n]\n", 1)[0]
    return re.findall(r'name: "([^"]+)"', body)


@pytest.mark.parametrize("gpu", sorted(PROFILES))
def test_render_graph_models_from_graphs_contract(tmp_path, gpu):
    """encoder/denoiser configs list exactly dgemma.core.contract's graph tensors (names, dtypes, dims without batch), batch up to
    GpuProfile.max_batch with dynamic batching; engine auto picks ONNX Runtime on CPU and the torch python variant on
    GPUs here (this Triton build has no tensorrt backend). On GPUs they are rendered for the bls loop only: next
    to an in-process torch loop they would just hold a second copy of the weights."""
    from dgemma.core import contract as graphs
    from dgemma.model.checkpoint import load_config
    from dgemma.core.contract import TRITON_DTYPES
    from dgemma.serving.render import render

    prof = PROFILES[gpu]
    p = prof.precisions[0].value
    plain = render(gpu, p, out=tmp_path / "default", backends=False)
    loop = (plain / "models" / "dgemma" / "config.pbtxt").read_text()
    want = "ort" if prof.sm == 0 else "torch"
    assert f'key: "backend" value: {{ string_value: "{want}" }}' in loop
    assert (plain / "models" / graphs.DENOISER).exists() == (prof.sm == 0)
    root = render(gpu, p, out=tmp_path, backends=False, backend="bls")
    cfg = load_config(DEFAULT_CHECKPOINT)[0]
    for g in graphs.GRAPHS:
        text = (root / "models" / g / "config.pbtxt").read_text()
        assert 'backend: "python"' in text and f"max_batch_size: {prof.max_batch}\n" in text
        assert "dynamic_batching {" in text
        assert f'key: "runtime" value: {{ string_value: "{"onnxruntime" if prof.sm == 0 else "torch"}" }}' in text
        gp = "fp32" if prof.sm == 0 else p
        ins, outs = graphs.inputs(g, cfg, gp), graphs.outputs(g, cfg, gp)
        assert _io_names(text, "input") == [t.name for t in ins]
        assert _io_names(text, "output") == [t.name for t in outs]
        for t in ins + outs:
            dims = [d if isinstance(d, int) else -1 for d in t.dims[1:]] or [1]
            row = f'{{ name: "{t.name}" data_type: {TRITON_DTYPES[t.dtype]} dims: [ {", ".join(map(str, dims))} ]'
            assert row in text
            assert (len(t.dims) == 1) == (f'{{ name: "{t.name}" data_type: {TRITON_DTYPES[t.dtype]} dims: [ 1 ] '
                                           "reshape: { shape: [ ] } }" in text)
        py = (root / "models" / g / "1" / "model.py").read_text()
        assert py.startswith("# rendered by `dgemma repo`") and "sys.path.insert(0, " in py.splitlines()[1]


@pytest.mark.parametrize("gpu, precision", [("h100", "fp8"), ("b200", "nvfp4"), ("h200", "bf16")])
def test_render_tensorrt_plan_variant(tmp_path, gpu, precision):
    """Where Triton has the tensorrt backend (an NGC build; not this one): platform tensorrt_plan over
    engines/<gpu>/<precision>/<graph>.plan, tensors in the precision's graph dtype (bf16; fp8 graphs are fp32), no
    model.py (render only: nothing here can run it)."""
    from dgemma.core import contract as graphs
    from dgemma.core.layout import current
    from dgemma.serving.render import render

    root = render(gpu, precision, out=tmp_path, engine="tensorrt", backends=False)
    for g in graphs.GRAPHS:
        d = root / "models" / g
        text = (d / "config.pbtxt").read_text()
        assert 'platform: "tensorrt_plan"' in text and 'backend: "python"' not in text
        assert 'default_model_filename: "model.plan"' in text and "kind: KIND_GPU" in text
        assert f"max_batch_size: {PROFILES[gpu].max_batch}\n" in text and "dynamic_batching {" in text
        want = {"bfloat16": "TYPE_BF16", "float32": "TYPE_FP32"}[graphs.kv_dtype(precision)]
        assert f'name: "{graphs.past_key(0)}" data_type: {want}' in text
        assert (d / "1" / "model.plan").is_symlink()
        assert (d / "1" / "model.plan").readlink() == current().engines(gpu, precision) / f"{g}.plan"
        assert not (d / "1" / "model.py").exists()
    loop = (root / "models" / "dgemma" / "config.pbtxt").read_text()
    assert 'key: "backend" value: { string_value: "bls" }' in loop  # GPUs drive the graph models through BLS


def test_render_rejects_unknown_engine_and_backend(tmp_path):
    from dgemma.core.errors import ConfigError
    from dgemma.serving.render import render

    with pytest.raises(ConfigError, match=r"unknown engine 'tvm' for the encoder/denoiser models; valid: auto"):
        render("cpu", "bf16", out=tmp_path, engine="tvm", backends=False)
    with pytest.raises(ConfigError, match=r"unknown canvas loop backend 'trt'; valid: ort, torch, bls"):
        render("cpu", "bf16", out=tmp_path, backend="trt", backends=False)

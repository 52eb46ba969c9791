"""GPU profiles: every (gpu, precision) resolves or raises ConfigError naming the rule and the fix."""

import pytest

from dgemma.core.errors import ConfigError
from dgemma.core.profiles import PROFILES, Precision, check_memory, describe, memory_plan, resolve


@pytest.mark.parametrize("gpu", sorted(PROFILES))
@pytest.mark.parametrize("precision", [p.value for p in Precision])
def test_every_pair_resolves_or_explains(gpu, precision):
    sm = PROFILES[gpu].sm
    ok = sm == 0 or precision == "bf16" or (precision == "fp8" and sm >= 89) or \
        (precision == "nvfp4" and (sm >= 100))
    if ok:
        t = resolve(gpu, precision)
        assert t.key == f"{gpu}/{precision}"
    else:
        with pytest.raises(ConfigError, match="needs compute capability"):
            resolve(gpu, precision)


def test_nvfp4_on_h100_names_rule_and_fix():
    with pytest.raises(ConfigError) as e:
        resolve("h100", "nvfp4")
    msg = str(e.value)
    assert "nvfp4" in msg and ">= 10.0" in msg and "'h100' is 9.0" in msg
    assert "--precision bf16/fp8 on h100" in msg and "b200" in msg and "rtx5090" in msg


def test_unknown_names_list_valid_ones():
    with pytest.raises(ConfigError, match="unknown GPU profile 'a100'; valid: h100, h200, b200, rtx5090, dgx-spark, cpu"):
        resolve("a100", "fp8")
    with pytest.raises(ConfigError, match="unknown precision 'int3'; valid: bf16, fp8, nvfp4"):
        resolve("h100", "int3")


def test_memory_check_bf16_two_engines_does_not_fit_h100():
    with pytest.raises(ConfigError) as e:
        check_memory(resolve("h100", "bf16"))
    msg = str(e.value)
    assert "2 engines x 47.0 GiB weights" in msg and "> 80 GiB" in msg and "precision fp8 fits" in msg
    plan = check_memory(resolve("h100", "fp8"))
    assert plan.total_gib < 80
    # one shared weight copy (our native CUDA path) fits bf16
    assert memory_plan(resolve("h100", "bf16"), engines=1).total_gib < 80


def test_describe_lists_every_profile():
    text = describe()
    assert all(name in text for name in PROFILES)


def test_engine_build_checks_memory_before_building(tmp_path, monkeypatch):
    """A full-size bf16 pair of engines is refused for h100 before TensorRT is even imported."""
    import dgemma.engines.build as eb
    from dgemma.core.config import FULL_SIZE

    monkeypatch.setattr(eb, "read_onnx_manifest",
                        lambda d: {"precision": "bf16", "model_config": FULL_SIZE.to_hf_dict()})
    monkeypatch.setattr(eb, "verify_onnx_files", lambda d, m: None)
    monkeypatch.setattr(eb.contract, "contract_hash", lambda cfg, p: None)
    monkeypatch.setattr(eb, "import_trt", lambda gpu: (_ for _ in ()).throw(AssertionError("built anyway")))
    with pytest.raises(ConfigError, match=r"> 80 GiB on NVIDIA H100 SXM 80GB\. precision fp8 fits"):
        eb.build_engines("h100", "bf16", onnx_root=tmp_path, out_root=tmp_path)


def test_profile_for_device_name():
    from dgemma.core.profiles import for_device

    assert for_device("NVIDIA H100 80GB HBM3") == "h100" and for_device("NVIDIA H200") == "h200"
    assert for_device("NVIDIA GeForce RTX 5090") == "rtx5090" and for_device("NVIDIA GB10") == "dgx-spark"
    with pytest.raises(ConfigError, match="RTX 4090"):
        for_device("NVIDIA GeForce RTX 4090")

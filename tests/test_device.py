"""The device a run uses: no silent CPU fallback for a real-size model, and what ran in the record."""

from __future__ import annotations

import pytest
import torch

from benchmark import data
from tests.conftest import compose


@pytest.fixture
def no_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # nothing cached
    monkeypatch.setattr(data, "_download", lambda *a: pytest.fail("downloaded the dataset"))


def sd15(tmp_path, *overrides: str):
    return compose(
        ["method=zoodip", "model=sd15", f"data.cache_dir={tmp_path / 'cache'}", f"paths.results={tmp_path}"]
        + list(overrides)
    )


def test_a_real_size_model_without_cuda_is_refused_first_naming_device_cpu(no_cuda, tmp_path):
    from benchmark.schema import problems, validate
    from methods.common.base import ConfigError

    found = problems(sd15(tmp_path))
    assert "device=auto found no CUDA device" in found[0] and "device=cpu" in found[0], found
    assert "Stable Diffusion weights" in found[1]  # then the weights, as before
    with pytest.raises(ConfigError, match="device=cpu") as refused:
        validate(sd15(tmp_path))
    assert "\n" not in str(refused.value)


def test_device_cpu_is_accepted_up_to_the_weights_check(no_cuda, tmp_path):
    from benchmark.schema import problems

    found = problems(sd15(tmp_path, "device=cpu"))
    assert found and "Stable Diffusion weights" in found[0], found
    assert not any("CUDA" in line for line in found)


@pytest.mark.parametrize(("model", "refused"), [("sd15_arch", True), ("sdxl_arch", True), ("tiny", False)])
def test_arch_models_are_refused_when_training_tiny_never(no_cuda, tmp_path, model, refused):
    from benchmark.schema import problems

    found = problems(sd15(tmp_path, f"model={model}"), inputs=False)
    assert any("device=auto found no CUDA device" in line for line in found) == refused, found


def test_predicting_memory_needs_no_gpu(no_cuda):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from benchmark.memory.cli import bad_values
    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="memory", overrides=["method=zoodip", "model=sd15_arch"])
    assert not any("CUDA" in line for line in bad_values(cfg))


def test_the_record_says_what_ran(monkeypatch):
    import sys
    import types

    from benchmark.run import device_fields

    cpu = device_fields(torch.device("cpu"))
    assert cpu == dict.fromkeys(("gpu_name", "gpu_compute_capability", "cuda_version", "gpu_driver"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.version, "cuda", "12.1")
    fake_nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlSystemGetDriverVersion=lambda: "535.104.05"
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    assert device_fields(torch.device("cuda:0")) == {
        "gpu_name": "NVIDIA A100-SXM4-80GB", "gpu_compute_capability": "8.0",
        "cuda_version": "12.1", "gpu_driver": "535.104.05",
    }  # fmt: skip


def test_allow_tf32_is_off_by_default_set_at_run_start_and_recorded(tiny_cfg, monkeypatch):
    from benchmark.config import run_dir_for
    from benchmark.run import record_base, set_tf32

    cfg = tiny_cfg()
    assert cfg.train.allow_tf32 is False
    assert run_dir_for(tiny_cfg("train.allow_tf32=true")) != run_dir_for(cfg)  # it changes the numbers
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    set_tf32(cfg.train.allow_tf32)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert record_base(cfg, run_dir_for(cfg), "dog6", "cpu")["allow_tf32"] is False


def test_qlora_auto_compute_dtype_is_fp16_on_a_gpu_without_bf16(monkeypatch):
    from methods.qlora import resolve_compute_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_compute_dtype("auto", "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_compute_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_compute_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize(
    ("model", "mu"),
    [
        ("sd15", 1e-3),
        ("sd15_arch", 1e-3),
        ("tiny", 1e-3),
        ("sd21", 1e-2),
        ("sdxl", 1e-2),
        ("sdxl_arch", 1e-2),
    ],
)
def test_zoodip_mu_is_the_papers_for_each_model(model, mu):
    from benchmark.config import method_config

    assert method_config(compose(["method=zoodip", f"model={model}"])).mu == mu
    assert method_config(compose(["method=zoodip", f"model={model}", "method.mu=5e-3"])).mu == 5e-3

"""DreamBooth, QLoRA, PEQA and TuneQDM on the tiny model: what trains and what stays frozen,
trainable-parameter counts, the stored artifact, reload into a fresh pipeline, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from benchmark import data, models
from benchmark.config import method_config
from benchmark.run import personalized_pipeline
from benchmark.train import train
from methods.common.base import ConfigError
from methods.common.lora_io import ATTENTION_PROJECTIONS
from methods.common.registry import method_class
from methods.qlora import quantize_linear_4bit, resolve_compute_dtype
from methods.tuneqdm import TimestepSets
from tests.tolerance import assert_close_up_to_reordering, assert_effect_dwarfs_tolerance

METHODS = ("dreambooth", "qlora", "peqa", "tuneqdm")
# learning rates large enough that two steps visibly change the tiny model
FAST_LR = {"dreambooth": "1e-3", "qlora": "1e-2", "peqa": "1e-3", "tuneqdm": "1e-3"}


def _setup(cfg, dataset_root):
    method_cfg = method_config(cfg)
    subject = data.get_subject("dog6")
    images = data.load_images(data.subject_image_paths(dataset_root, subject), method_cfg.resolution)
    components = models.load_components(cfg.model)
    method = method_class(method_cfg.name)(method_cfg)
    method.setup(components, subject)
    return method, components, images


def _trained(tiny_cfg, dataset_root, tmp_path, name, *overrides, steps=2):
    cfg = tiny_cfg(f"method={name}", f"method.lr={FAST_LR[name]}", *overrides)
    method, components, images = _setup(cfg, dataset_root)
    before = {k: v.detach().clone() for k, v in components.unet.state_dict().items()}
    result = train(
        method, images, steps, method.cfg.batch_size, 0, tmp_path, torch.device("cpu"), progress=False
    )
    return cfg, method, components, images, before, result


def _unet_inputs():
    g = torch.Generator().manual_seed(1)
    # two samples whose timesteps fall into different TuneQDM scale sets
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([120, 870]), torch.randn(2, 77, 32, generator=g)


@torch.no_grad()
def _unet_out(unet):
    return unet(*_unet_inputs()).sample


def _image(pipeline):
    out = pipeline(
        "a photo of sks dog",
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return torch.from_numpy(out.images[0])


def _expected_trainable(name, unet: nn.Module, cfg) -> int:
    """The method's definition, counted on the original (float) U-Net."""
    if name == "dreambooth":
        return sum(p.numel() for p in unet.parameters())
    if name == "qlora":
        return sum(
            cfg.rank * (m.in_features + m.out_features)
            for n, m in unet.named_modules()
            if isinstance(m, nn.Linear) and any(n.endswith("." + t) for t in ATTENTION_PROJECTIONS)
        )
    layers = [m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    out = sum(m.weight.shape[0] for m in layers)
    if name == "peqa":
        return out
    ins = sum(m.in_features if isinstance(m, nn.Linear) else m.in_channels for m in layers)
    return cfg.timestep_sets * (out + (ins if cfg.train_delta_in else 0))


@pytest.mark.parametrize("name", METHODS)
def test_only_the_method_s_tensors_train(name, tiny_cfg, dataset_root, tmp_path):
    cfg, method, components, _, before, result = _trained(tiny_cfg, dataset_root, tmp_path, name)
    assert result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))
    trainable = set(method.trainable_parameters())
    assert trainable == {n for n, p in components.unet.named_parameters() if p.requires_grad}
    assert not any(p.requires_grad for m in (components.text_encoder, components.vae) for p in m.parameters())

    fresh = models.load_components(cfg.model)
    count = _expected_trainable(name, fresh.unet, method.cfg)
    assert sum(p.numel() for p in method.trainable_parameters().values()) == count
    assert sum(v.numel() for v in method.state_dict().values()) == count

    after = components.unet.state_dict()
    assert set(after) == set(before)
    for key, value in after.items():
        if key in trainable:
            assert not torch.equal(value, before[key]), f"trainable {key} did not move"
        else:
            assert torch.equal(value, before[key]), f"frozen {key} changed"
    for part in ("text_encoder", "vae"):
        fresh_state = getattr(fresh, part).state_dict()
        for key, value in getattr(components, part).state_dict().items():
            assert torch.equal(value, fresh_state[key]), f"{part}.{key} changed"


@pytest.mark.parametrize("name", METHODS)
def test_artifact_reloads_into_a_fresh_pipeline(name, tiny_cfg, dataset_root, tmp_path):
    cfg, method, components, _, _, _ = _trained(tiny_cfg, dataset_root, tmp_path, name)
    path = method.save_artifact(tmp_path)
    artifact = load_file(str(path))
    # the file holds exactly the trained tensors (QLoRA: alpha = rank, nothing folded)
    assert sum(v.numel() for v in artifact.values()) == sum(
        p.numel() for p in method.trainable_parameters().values()
    )
    assert all(v.dtype == torch.float32 for v in artifact.values())

    stock = models.load_pipeline(cfg.model)
    applied = models.load_pipeline(cfg.model)
    if name == "qlora":  # the trained model's own base: the same (deterministic) NF4 weights
        quantize_linear_4bit(applied.unet)
        applied.unet.is_loaded_in_4bit = True
    method.apply(applied, artifact)
    trained_out = _unet_out(components.unet)
    assert_close_up_to_reordering(_unet_out(applied.unet), trained_out)
    assert_effect_dwarfs_tolerance(_unet_out(stock.unet), trained_out)  # training changed the output
    trained_image = _image(models.build_pipeline(components))
    assert_close_up_to_reordering(_image(applied), trained_image)

    if name == "qlora":  # and a stock full-precision pipeline takes the LoRA file as it is
        stock_lora = models.load_pipeline(cfg.model)
        method.apply(stock_lora, artifact)
        assert not torch.allclose(_unet_out(stock_lora.unet), _unet_out(stock.unet), atol=1e-4)
        assert not torch.allclose(_image(stock_lora), _image(stock), atol=1e-4)


@pytest.mark.parametrize("eval_base", ["nf4", "full"])
def test_qlora_eval_base_scores_the_trained_nf4_model_or_the_full_precision_one(
    eval_base, tiny_cfg, dataset_root, tmp_path
):
    import bitsandbytes as bnb

    cfg, method, components, _, _, _ = _trained(
        tiny_cfg, dataset_root, tmp_path, "qlora", f"method.eval_base={eval_base}"
    )
    artifact = load_file(str(method.save_artifact(tmp_path)))
    applier = method_class("qlora")(method.cfg)
    pipeline = personalized_pipeline(cfg.model, applier, artifact, "cpu", torch.float32)
    four_bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in pipeline.unet.modules())
    if eval_base == "nf4":  # the very model that was trained: same NF4 codes, same LoRA
        assert four_bit == method.quantized_layers > 0
        torch.testing.assert_close(_unet_out(pipeline.unet), _unet_out(components.unet), rtol=1e-5, atol=1e-5)
    else:
        assert four_bit == 0
        assert not torch.allclose(_unet_out(pipeline.unet), _unet_out(components.unet), atol=1e-4)
    assert method.record_extras()["qlora_compute_dtype"] == "fp32"  # compute_dtype=auto on CPU


@pytest.mark.parametrize("in_features", [32, 256])
def test_a_4bit_layer_evaluates_as_it_trained_on_a_bf16_capable_cpu(in_features, monkeypatch):
    """bitsandbytes repacks a CPU Linear4bit for its bf16 kernel at the first no-grad eval forward
    where the CPU has AVX512-BF16 (absmax rounded to bf16; an error for in_features < 128). The
    CPU capability is forced on so the check holds on any machine."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True, raising=False)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, 64))
    nn.init.normal_(model[0].weight, generator=gen)
    quantize_linear_4bit(model)
    x = torch.randn(3, in_features, generator=gen)
    trained = model.train()(x).detach()
    with torch.no_grad():
        evaluated = model.eval()(x)
    torch.testing.assert_close(evaluated, trained, rtol=0, atol=0)


def test_qlora_compute_dtype_auto_is_the_paper_s_bf16_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # a GPU with bf16
    assert resolve_compute_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_compute_dtype("auto", "cpu") == torch.float32
    assert resolve_compute_dtype("fp16", "cpu") == torch.float16


@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bit_identical(name, tiny_cfg, dataset_root, tmp_path):
    cfg = tiny_cfg(f"method={name}", f"method.lr={FAST_LR[name]}")
    straight, _, images = _setup(cfg, dataset_root)
    train(straight, images, 2, 1, 0, tmp_path / "straight", torch.device("cpu"), progress=False)

    interrupted, _, _ = _setup(cfg, dataset_root)  # leaves a checkpoint after step 1
    train(
        interrupted,
        images,
        2,
        1,
        0,
        tmp_path / "resumed",
        torch.device("cpu"),
        checkpoint_every=1,
        progress=False,
    )
    resumed, _, _ = _setup(cfg, dataset_root)
    result = train(resumed, images, 2, 1, 0, tmp_path / "resumed", torch.device("cpu"), progress=False)
    assert result.resumed_from == 1
    for key, value in straight.trainable_parameters().items():
        assert torch.equal(value, resumed.trainable_parameters()[key]), key


def test_tuneqdm_picks_the_scale_set_per_sample(tiny_cfg, dataset_root, tmp_path):
    sets = TimestepSets(4, 1000)
    sets.set_from_timesteps(torch.tensor([0, 249, 250, 999]), 4, "cpu")
    assert sets.index.tolist() == [0, 0, 1, 3]
    sets.set_from_timesteps(torch.tensor(600), 3, "cpu")  # a pipeline's scalar timestep
    assert sets.index.tolist() == [2, 2, 2]

    cfg, method, components, _, _, _ = _trained(
        tiny_cfg, dataset_root, tmp_path, "tuneqdm", "method.batch_size=2", steps=3
    )
    delta_out = next(iter(method.trainable_parameters().values()))
    assert delta_out.shape[0] == 4 and len({tuple(row.tolist()) for row in delta_out}) > 1  # sets learn apart
    x, t, h = _unet_inputs()

    @torch.no_grad()
    def one_by_one():
        return torch.cat([components.unet(x[i : i + 1], t[i : i + 1], h[i : i + 1]).sample for i in range(2)])

    before = one_by_one()
    with torch.no_grad():  # make every set distinct, so a wrong set shows in the output
        for tensor in method.trainable_parameters().values():
            tensor.mul_(1 + 0.1 * torch.arange(4.0).reshape(4, 1))
        batch = components.unet(x, t, h).sample
    singles = one_by_one()
    assert_close_up_to_reordering(batch, singles)  # fp32 rounding only: BLAS blocks a batch differently
    assert_effect_dwarfs_tolerance(before, singles)  # a 10 % change of a set is far outside it


def test_dreambooth_prior_preservation_generates_and_caches_class_images(
    tiny_cfg, dataset_root, tmp_path, monkeypatch
):
    overrides = (
        "method=dreambooth",
        "method.prior_preservation=true",
        "method.num_class_images=2",
        "method.class_inference_steps=2",
        f"method.class_images_dir={tmp_path / 'class_images'}",
    )
    cfg = tiny_cfg(*overrides)
    method, components, images = _setup(cfg, dataset_root)
    (folder,) = (tmp_path / "class_images" / "dog").iterdir()  # one settings key
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png"]
    assert json.loads((folder / "settings.json").read_text())["prompt"] == "a photo of dog"
    assert method.class_pixels.shape == (2, 3, 64, 64) and method.class_pixels.dtype == torch.uint8

    g = torch.Generator().manual_seed(0)
    pixels, prompts = method.training_batch({"pixel_values": images[:1]}, g)
    assert pixels.shape[0] == 2 and prompts == ["a photo of sks dog", "a photo of dog"]
    result = train(method, images, 1, 1, 0, tmp_path / "run", torch.device("cpu"), progress=False)
    assert torch.isfinite(torch.tensor(result.final_loss))

    import benchmark.models

    monkeypatch.setattr(benchmark.models, "build_pipeline", lambda *_: pytest.fail("regenerated"))
    again, _, _ = _setup(cfg, dataset_root)  # reads the cache
    assert torch.equal(again.class_pixels, method.class_pixels)


def test_dreambooth_class_image_cache_is_keyed_by_weights_and_settings(tiny_cfg, dataset_root, tmp_path):
    """Another guidance scale, or other base weights under the same model name, must not reuse
    the cached class images."""
    overrides = (
        "method=dreambooth",
        "method.prior_preservation=true",
        "method.num_class_images=1",
        "method.class_inference_steps=1",
        f"method.class_images_dir={tmp_path}",
    )
    _setup(tiny_cfg(*overrides), dataset_root)
    _setup(tiny_cfg(*overrides, "method.class_guidance_scale=1.0"), dataset_root)
    cfg = tiny_cfg(*overrides)
    components = models.load_components(cfg.model)
    with torch.no_grad():
        components.unet.conv_in.weight.add_(1.0)  # a fine-tuned base with the same name
    from methods.dreambooth import class_images

    class_images(components, "dog", method_config(cfg))
    assert len(list((tmp_path / "dog").iterdir())) == 3


@pytest.mark.parametrize(
    "override,match",
    [
        ("method=peqa method.bits=3", "method.bits=3"),
        ("method=tuneqdm method.timestep_sets=0", "method.timestep_sets=0"),
        ("method=qlora method.rank=0", "method.rank=0"),
        ("method=qlora method.quant_type=int3", "int3"),
        ("method=qlora method.eval_base=int8", "eval_base"),
        ("method=qlora method.compute_dtype=fp64", "compute_dtype"),
        ("method=dreambooth method.precision=fp16", "fp16"),
        ("method=dreambooth method.prior_preservation=true method.class_images_dir=null", "class_images_dir"),
    ],
)
def test_bad_values_are_refused(override, match, tiny_cfg):
    with pytest.raises(ConfigError, match=match):
        method_config(tiny_cfg(*override.split()))


@pytest.mark.integration
@pytest.mark.parametrize("name", METHODS)
def test_cli_writes_a_complete_record(name, tiny_cfg, dataset_root):
    from benchmark.records import REQUIRED_FIELDS
    from benchmark.run import run, run_dir_for

    cfg = tiny_cfg(f"method={name}", "train.max_steps=2")
    record = run(cfg)
    assert record["status"] == "ok", record["error"]
    run_dir = run_dir_for(cfg)
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert all(
        on_disk[k] is not None for k in ("clip_t", "clip_i", "dino", "artifact_bytes", "trainable_params")
    )
    assert set(REQUIRED_FIELDS) <= set(on_disk)
    artifact = run_dir / method_class(name).artifact_filename
    assert on_disk["artifact_bytes"] == artifact.stat().st_size
    assert sum(v.numel() for v in load_file(str(artifact)).values()) == on_disk["trainable_params"]

"""ZOODiP on the tiny model: a step is n+1 forward passes and no autograd, only the placeholder
row moves, the quantized weights stay integer and untouched, resume is bit-identical, and a
sweep of its ablation knobs makes complete runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from benchmark import data, models
from benchmark.config import method_config, training_dtype
from benchmark.records import REQUIRED_FIELDS
from benchmark.train import step_generator
from methods.common.base import ConfigError
from methods.common.quant import QuantizedLayer, quantize_per_channel, quantized_layers
from methods.common.quant_groupwise import GroupwiseQuantizedLayer
from methods.common.quantized_model import quantize_networks
from methods.zoodip import ZOODiP
from tests.conftest import run_sweep_in_process


@pytest.fixture
def images(dataset_root):
    return data.load_images(data.subject_image_paths(dataset_root, data.get_subject("dog6")), 64)


@pytest.fixture
def make_method(tiny_cfg):
    def make(*overrides: str):
        # fp32 unless asked: CPU fp16 convolutions are several times slower (the default, fp16, is
        # the paper's and is exercised by the forward-pass test)
        cfg = tiny_cfg("method=zoodip", "method.precision=fp32", *overrides)
        method_cfg = method_config(cfg)
        components = models.load_components(cfg.model, dtype=training_dtype(method_cfg))
        method = ZOODiP(method_cfg)
        method.setup(components, data.get_subject("dog6"))
        return method, components, cfg

    return make


def run_steps(method, images, steps):
    for step in steps:
        generator = step_generator(0, step)
        index = torch.randint(len(images), (1,), generator=generator)
        method.step({"pixel_values": images[index], "generator": generator, "index": index}, step)


@pytest.mark.parametrize("mode, code_dtype", [("int8", torch.int8), ("int4", torch.uint8)])
def test_every_linear_and_conv_is_quantized_embeddings_and_norms_are_not(tiny_cfg, mode, code_dtype):
    cfg = tiny_cfg("method=zoodip")
    components = models.load_components(cfg.model, dtype=torch.float16)
    x, t, hidden = torch.randn(1, 4, 8, 8).half(), torch.tensor([600]), torch.randn(1, 77, 32).half()
    with torch.no_grad():
        reference = components.unet(x, t, hidden).sample.float()
    counts = quantize_networks(components, mode)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(components, name)
        assert counts[name] > 0
        assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in module.modules()), name
        for layer in module.modules():
            if isinstance(layer, QuantizedLayer):
                assert layer.qweight.dtype == code_dtype and layer.bits == (8 if mode == "int8" else 4)
            if isinstance(layer, (torch.nn.Embedding, torch.nn.GroupNorm, torch.nn.LayerNorm)):
                assert layer.weight.dtype == torch.float16
        assert module.dtype == torch.float16  # scales in the activation dtype: diffusers' dtype still fp16
    with torch.no_grad():
        quantized = components.unet(x, t, hidden).sample.float()
    error = (quantized - reference).norm() / reference.norm()
    assert 0 < error < (0.05 if mode == "int8" else 0.5)


@pytest.mark.parametrize(
    "estimator, n, passes, precision", [("rge", 2, 3, "fp16"), ("rge", 1, 2, "fp32"), ("spsa", 2, 4, "fp32")]
)
def test_step_is_n_plus_one_forward_passes_without_autograd(
    make_method, images, estimator, n, passes, precision
):
    method, components, _ = make_method(
        f"method.estimator={estimator}", f"method.n={n}", f"method.precision={precision}"
    )
    grad_modes = []
    handle = components.unet.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    run_steps(method, images, [0])
    handle.remove()
    assert len(grad_modes) == passes and not any(grad_modes)
    assert method.record_extras()["forward_passes_per_step"] == passes
    for name in ("unet", "vae", "text_encoder"):
        for tensor in getattr(components, name).parameters():
            assert tensor.grad is None and not tensor.requires_grad
    assert method.token.grad is None and not method.token.requires_grad


@pytest.mark.parametrize(("model", "mu"), [("tiny", 1.0), ("tiny_sdxl", 10.0)])
def test_batched_passes_estimate_the_sequential_gradient_within_fp32_tolerance(
    make_method, images, model, mu
):
    # rtol 1e-5: the fp32 loss's relative rounding (a few ulp of 1.2e-7 over the layers). mu = 1
    # keeps the finite differences L_i - L_0 well above it, so the gradients can be compared (the
    # tiny SDXL's loss moves less with its token: mu = 10). SDXL: each encoder gets its part of
    # the concatenated vector, the U-Net the pooled and size inputs.
    rtol, n = 1e-5, 3
    method, _, _ = make_method(f"model={model}", "method.precision=fp32", f"method.mu={mu}", f"method.n={n}")
    estimates = {}
    for batched in (False, True):
        method.cfg.batched_passes = batched
        batch = {"pixel_values": images[:1], "index": torch.tensor([0]), "generator": step_generator(0, 7)}
        estimates[batched] = method.estimate(batch)
    (sequential, loss), (batched, batched_loss) = estimates[False], estimates[True]
    torch.testing.assert_close(batched_loss, loss, rtol=rtol, atol=0)
    # each of the n coefficients (L_i - L_0) / mu may be off by 2 rtol L / mu, times |z| < 6
    scale = 1 / (n * ((method.token.numel() + n - 1) / n) ** 0.5)
    atol = n * 2 * rtol * float(loss) / mu * 6 * scale
    assert sequential.abs().max() > 10 * atol  # a gradient much larger than the tolerance
    torch.testing.assert_close(batched, sequential, rtol=0, atol=atol)


def test_batched_fp16_losses_match_one_pass_per_token_value(make_method, images):
    # fp16 (the paper's precision): the U-Net output rounds at ~1e-3 relative; the MSE averages
    # that down, so 2e-3 bounds each loss
    method, _, _ = make_method("method.precision=fp16")
    batch = {"pixel_values": images[:1], "index": torch.tensor([0]), "generator": step_generator(0, 7)}
    with torch.no_grad():
        loss_fn, losses_fn = method.loss_functions(*method.denoising_inputs(batch))
        clean = method.token.clone()
        points = [[clean + 0.5 * k * torch.randn(clean.shape, generator=torch.Generator().manual_seed(k))]
                  for k in range(3)]  # fmt: skip
        sequential = []
        for (token,) in points:
            method.token.copy_(token)
            sequential.append(loss_fn().float())
        method.token.copy_(clean)
        batched = losses_fn(points)
    torch.testing.assert_close(batched, torch.stack(sequential), rtol=2e-3, atol=0)


def test_batched_step_calls_the_unet_once_with_n_plus_one_rows(make_method, images):
    method, components, _ = make_method("method.batched_passes=true")
    batch_sizes = []
    handle = components.unet.register_forward_hook(lambda m, args, out: batch_sizes.append(len(args[0])))
    run_steps(method, images, [0])
    handle.remove()
    assert batch_sizes == [3]


@pytest.mark.parametrize("batched", ["false", "true"])
def test_only_the_placeholder_row_changes_and_quantized_weights_stay_untouched(make_method, images, batched):
    method, components, _ = make_method("method.tau=2", "method.lr=0.05", f"method.batched_passes={batched}")
    before = {
        name: {k: v.clone() for k, v in getattr(components, name).state_dict().items()}
        for name in ("unet", "vae", "text_encoder")
    }
    run_steps(method, images, range(3))
    assert int(method.subspace.removed_dims()) > 0  # SG recomputed (tau=2) and projected
    for name, state in before.items():
        for key, value in getattr(components, name).state_dict().items():
            if key.endswith("qweight"):
                assert value.dtype == torch.int8
            if key.endswith("token_embedding.weight"):
                moved = (value != state[key]).any(dim=1).nonzero().flatten().tolist()
                assert moved == [method.token_row]
            else:
                assert torch.equal(value, state[key]), f"{name}.{key} changed"


def test_resume_from_checkpoint_is_bit_identical(make_method, images):
    straight, _, _ = make_method("method.tau=2")
    run_steps(straight, images, range(4))
    first, _, _ = make_method("method.tau=2")
    run_steps(first, images, range(2))
    state = first.checkpoint()
    resumed, components, _ = make_method("method.tau=2")
    resumed.restore(state)
    run_steps(resumed, images, range(2, 4))
    assert torch.equal(resumed.token, straight.token)
    assert torch.equal(components.text_encoder.get_input_embeddings().weight[resumed.token_row],
                       straight.token)  # fmt: skip


def test_adam_state_dtype_fp16_keeps_official_fp16_moments_and_changes_the_token(make_method, images):
    fp32, _, _ = make_method("method.tau=2")
    fp16, _, _ = make_method("method.tau=2", "method.adam_state_dtype=fp16")
    run_steps(fp32, images, range(3))
    run_steps(fp16, images, range(3))
    assert fp16.adam.m[0].dtype == fp16.adam.v[0].dtype == torch.float16
    assert fp32.adam.v[0].dtype == torch.float32
    assert not torch.equal(fp16.token, fp32.token)


def test_artifact_is_a_token_file_that_a_quantized_stock_pipeline_loads(make_method, images, tmp_path):
    method, _, cfg = make_method("method.lr=0.05")
    run_steps(method, images, range(2))
    artifact = load_file(str(method.save_artifact(tmp_path)))
    assert list(artifact) == ["<sks>"] and artifact["<sks>"].shape == (1, 32)
    pipeline = models.load_pipeline(cfg.model)
    ZOODiP(method.cfg).apply(pipeline, artifact)  # apply works from the config alone
    assert isinstance(pipeline.unet.conv_in, QuantizedLayer)  # official inference quantizes too
    row = pipeline.tokenizer.convert_tokens_to_ids("<sks>")
    assert torch.equal(pipeline.text_encoder.get_input_embeddings().weight[row], artifact["<sks>"][0])


def test_table_s8_int4_is_quanto_groupwise_on_the_unet_only(tiny_cfg):
    cfg = tiny_cfg("method=zoodip", "+experiment/tableS8=int4")
    method_cfg = method_config(cfg)
    assert (method_cfg.quantize, method_cfg.quantize_scope, method_cfg.int4_scheme) == (
        "int4",
        "unet",
        "affine_group128",
    )
    assert method_cfg.precision == "bf16" and method_cfg.mu == 1e-2
    components = models.load_components(cfg.model)
    counts = quantize_networks(components, "int4", method_cfg.quantize_scope, method_cfg.int4_scheme)
    assert counts["unet"] > 0 and counts["vae"] == counts["text_encoder"] == 0
    assert all(isinstance(m, GroupwiseQuantizedLayer) for m in quantized_layers(components.unet).values())
    assert not quantized_layers(components.vae) and not quantized_layers(components.text_encoder)
    per_channel = models.load_components(cfg.model)
    quantize_networks(per_channel, "int4", "all", "symmetric_channel")  # the former scheme, a switch
    layers = quantized_layers(per_channel.vae)
    assert layers and not any(isinstance(m, GroupwiseQuantizedLayer) for m in layers.values())


@pytest.mark.parametrize(
    "override",
    ["method.estimator=fd", "method.n=0", "method.mu=0", "method.quantize=int2", "method.T_L=900",
     "method.timesteps=cosine", "method.tau=1", "method.nu=1.5", "method.precision=fp64",
     "method.adam_state_dtype=bf16", "method.quantize_scope=vae", "method.int4_scheme=nf4",
     "method.protocol=ours", "method.captions=/no/such/cc.json"],
)  # fmt: skip
def test_bad_settings_are_config_errors(tiny_cfg, override):
    with pytest.raises(ConfigError):
        method_config(tiny_cfg("method=zoodip", override))


@pytest.mark.integration
def test_a_tau_nu_sweep_makes_four_complete_runs(tmp_path, dataset_root):
    """The sweep's runs in this process (tests/sweep/test_sweep.py runs `python -m benchmark -m`)."""
    records = run_sweep_in_process(
        ["method=zoodip", "subject=dog6", "model=tiny", "method.tau=32,64", "method.nu=1e-3,1e-2",
         f"data.root={dataset_root}", f"paths.results={tmp_path / 'results'}", "method.precision=fp32",
         "train.max_steps=2", "train.progress=false", "train.profile_steps=0"]
    )  # fmt: skip
    assert sorted((r["method.tau"], r["method.nu"]) for r in records) == [
        (32, 1e-3),
        (32, 1e-2),
        (64, 1e-3),
        (64, 1e-2),
    ]
    for record in records:
        assert set(REQUIRED_FIELDS) <= set(record) and record["status"] == "ok"
        assert record["train_steps"] == 2 and record["forward_passes_per_step"] == 3
        assert record["method.quantize"] == "int8" and record["quantized_layers"] > 0
        assert record["trainable_params"] == 32 and record["clip_i"] is not None


def codes_by_layer(module) -> dict[str, torch.Tensor]:
    return {name: layer.integer_weight() for name, layer in quantized_layers(module).items()}


def expected_codes(reference, dtype, arithmetic) -> dict[str, torch.Tensor]:
    """Codes of every Linear/Conv2d of ``reference`` (fp32 weights) cast to ``dtype`` first."""
    return {
        name: quantize_per_channel(m.weight.to(dtype), 8, True, arithmetic)[0]
        for name, m in reference.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }


def differing_codes(a: dict, b: dict) -> int:
    assert a.keys() == b.keys()
    return sum(int((a[k] != b[k]).sum()) for k in a)


@pytest.mark.parametrize("protocol", ["paper", "official"])
def test_official_protocol_quantizes_as_the_script_and_paper_is_unchanged(tiny_cfg, protocol):
    """official (train_zoodip.py): U-Net and VAE cast to fp16, then quanto's codes in fp16; the
    text encoder's codes from its fp32 weights, then cast; lr 1e-2 and fp16 moments. paper: every
    network loaded in fp16 and quantized with fp32 arithmetic, lr 5e-3, fp32 moments."""
    cfg = tiny_cfg("method=zoodip", f"method.protocol={protocol}")
    method_cfg = method_config(cfg)
    official = protocol == "official"
    assert (method_cfg.lr, method_cfg.adam_state_dtype) == ((1e-2, "fp16") if official else (5e-3, "fp32"))
    assert training_dtype(method_cfg) == (torch.float32 if official else torch.float16)
    reference = models.load_components(cfg.model)  # fp32: the checkpoint's weights
    components = models.load_components(cfg.model, dtype=training_dtype(method_cfg))
    method = ZOODiP(method_cfg)
    method.setup(components, data.get_subject("dog6"))
    assert (
        method.adam.dtype == (torch.float16 if official else torch.float32)
        and method.adam.lr == method_cfg.lr
    )
    for name in ("unet", "vae", "text_encoder"):
        ours = codes_by_layer(getattr(components, name))
        if official and name == "text_encoder":
            expected = expected_codes(getattr(reference, name), torch.float32, "fp32")
        else:
            expected = expected_codes(
                getattr(reference, name), torch.float16, "weight" if official else "fp32"
            )
        assert differing_codes(ours, expected) == 0, name
        other = expected_codes(getattr(reference, name), torch.float16, "fp32" if official else "weight")
        assert differing_codes(ours, other) > 0, name  # the two protocols' codes do differ here
        floats = {p.dtype for p in getattr(components, name).parameters()}
        assert floats == {torch.float16}, name  # scales, norms, embeddings: all cast


def test_official_protocol_applies_the_same_quantization_to_the_stock_pipeline(tiny_cfg):
    cfg = tiny_cfg("method=zoodip", "method.protocol=official")
    method = ZOODiP(method_config(cfg))
    assert method.apply_weights_dtype() == torch.float32
    reference = models.load_components(cfg.model)
    pipeline = models.load_pipeline(cfg.model, dtype=method.apply_weights_dtype())
    method.quantize(pipeline)
    assert (
        differing_codes(
            codes_by_layer(pipeline.unet), expected_codes(reference.unet, torch.float16, "weight")
        )
        == 0
    )
    text = expected_codes(reference.text_encoder, torch.float32, "fp32")
    assert differing_codes(codes_by_layer(pipeline.text_encoder), text) == 0
    assert ZOODiP(method_config(tiny_cfg("method=zoodip"))).apply_weights_dtype() is None


def test_captions_give_each_image_its_own_prompt(make_method, images, tmp_path):
    captions = tmp_path / "cc.json"
    names = [f"{i:02d}.jpg" for i in range(len(images))]
    captions.write_text(
        json.dumps({"dog6": {n: f"a photo of a {{}} number {i}" for i, n in enumerate(names)}})
    )
    method, _, _ = make_method(f"method.captions={captions}")
    method.precompute(images, 0, 2)
    batch = {"pixel_values": images[[3, 1]], "image_index": torch.tensor([3, 1])}
    assert method.training_prompts(batch, step_generator(0, 0)) == [
        "a photo of a <sks> number 3",
        "a photo of a <sks> number 1",
    ]
    assert method.record_extras()["training_prompts"] == "captions"
    captions.write_text(json.dumps({"dog6": {n: "{}" for n in names[:-1]}}))
    short, _, _ = make_method(f"method.captions={captions}")
    with pytest.raises(ConfigError, match="4 captions for this subject's 5 images"):
        short.precompute(images, 0, 2)
    captions.write_text(json.dumps({"cat": {"00.jpg": "{}"}}))  # no entry for dog6: the templates
    templates, _, _ = make_method(f"method.captions={captions}")
    assert templates.captions is None and templates.record_extras()["training_prompts"] == "templates"

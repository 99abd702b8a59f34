"""On CUDA the evaluation pipeline runs in fp16 (benchmark/run.py), a path no CPU run takes:
every method's artifact must load into an fp16 stock pipeline, keep it fp16 throughout (a
stray fp32 tensor is a dtype error in CUDA matmuls), and change what it generates."""

from __future__ import annotations

import pytest
import torch

from benchmark import data, models
from benchmark.config import method_config, training_dtype
from benchmark.generate import eval_prompts
from benchmark.run import personalized_pipeline
from methods.common.quant import quantized_layers
from methods.common.registry import method_class, method_names


def perturbed_artifact(method) -> dict[str, torch.Tensor]:
    """The untrained artifact with 5 % noise, so that applying it must show (a LoRA's B starts
    at 0)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, value in method.state_dict().items():
        value = value.detach().cpu()
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=g, dtype=torch.float32)
            size = value.float().abs().mean().item() or 1.0  # a LoRA's zero B gets unit-sized noise
            value = (value.float() + 0.05 * size * noise).to(value.dtype)
        out[key] = value.contiguous()
    return out


def fp16_image(pipeline, prompt: str) -> torch.Tensor:
    return pipeline(
        prompt, num_inference_steps=2, guidance_scale=3.0, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


@pytest.mark.parametrize("name", method_names())
def test_artifact_applies_to_an_fp16_pipeline(tiny_cfg, name):
    cfg = tiny_cfg(f"method={name}")
    method_cfg = method_config(cfg)
    subject = data.get_subject("dog6")
    trainer = method_class(name)(method_cfg)
    trainer.setup(models.load_components(cfg.model, dtype=training_dtype(method_cfg)), subject)
    size = method_cfg.resolution
    trainer.precompute(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1, 0, 1)
    artifact = perturbed_artifact(trainer)

    base = models.load_pipeline(cfg.model, dtype=torch.float16)
    applier = method_class(name)(method_cfg)
    personalized = personalized_pipeline(cfg.model, applier, artifact, "cpu", torch.float16)
    for module in (personalized.unet, personalized.text_encoder, personalized.vae):
        assert module.dtype == torch.float16  # what the pipeline casts its inputs to
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        assert dtypes == {torch.float16}, (type(module).__name__, dtypes)

    prompt = eval_prompts(subject, applier, cfg.eval)[0]
    image = fp16_image(personalized, prompt.prompt)
    assert torch.isfinite(image).all()
    assert not torch.equal(image, fp16_image(base, prompt.prompt))


@pytest.mark.parametrize("name", ["peqa", "tuneqdm"])
def test_fp16_evaluation_pipeline_holds_exactly_the_trained_integer_codes(tiny_cfg, name):
    """The evaluated model is the trained one: apply quantizes the fp32 weights (then casts),
    so every integer code and zero point equals training's; quantizing fp16 weights would not."""
    cfg = tiny_cfg(f"method={name}")
    method_cfg = method_config(cfg)
    trainer = method_class(name)(method_cfg)
    components = models.load_components(cfg.model, dtype=training_dtype(method_cfg))
    trainer.setup(components, data.get_subject("dog6"))
    trained = quantized_layers(components.unet)
    applier = method_class(name)(method_cfg)
    personalized = personalized_pipeline(
        cfg.model, applier, perturbed_artifact(trainer), "cpu", torch.float16
    )
    applied = quantized_layers(personalized.unet)
    assert applied.keys() == trained.keys() and len(trained) > 0
    for key, layer in applied.items():
        assert torch.equal(layer.integer_weight(), trained[key].integer_weight()), key
        assert torch.equal(layer.zero_point, trained[key].zero_point), key
        assert layer.scale.dtype == torch.float16

    from_fp16 = models.load_pipeline(cfg.model, dtype=torch.float16)
    method_class(name)(method_cfg).apply(from_fp16, perturbed_artifact(trainer))
    flipped = sum(
        int((layer.integer_weight() != trained[key].integer_weight()).sum())
        for key, layer in quantized_layers(from_fp16.unet).items()
    )
    assert flipped > 0  # the check above is not vacuous: fp16 weights round to other codes

"""Gradient-Free TI on the tiny model: CMA-ES lowers the loss with forward passes only, its
state survives a checkpoint, and the artifact is a diffusers textual-inversion file."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmark import data, models
from benchmark.config import method_config
from benchmark.records import REQUIRED_FIELDS
from benchmark.run import run
from benchmark.train import step_generator
from methods.base import ConfigError
from methods.gfti import GradientFreeTI, principal_directions


@pytest.fixture
def images(dataset_root):
    return data.load_images(data.subject_image_paths(dataset_root, data.get_subject("dog6")), 64)


@pytest.fixture
def make_method(tiny_cfg, images):
    def make(*overrides: str, protocol: str = "ours"):
        # fp32: CPU fp16 convolutions are several times slower (fp16, the default, runs in test_run_...)
        cfg = tiny_cfg(
            "method=gfti",
            "method.popsize=6",
            "method.precision=fp32",
            f"method.protocol={protocol}",
            *overrides,
        )
        components = models.load_components(cfg.model)
        method = GradientFreeTI(method_config(cfg))
        method.setup(components, data.get_subject("dog6"))
        method.precompute(images, 0, 1)
        return method, components, cfg

    return make


def generation(method, images, step, seed_step=None):
    generator = step_generator(0, step if seed_step is None else seed_step)
    index = torch.randint(len(images), (1,), generator=generator)
    return method.step({"pixel_values": images[index], "generator": generator, "index": index}, step)


def test_principal_directions_are_the_top_axes_of_the_rows():
    g = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    scales = torch.tensor([10.0, 5.0, 2.0, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    rows = (torch.randn(4000, 8, generator=g, dtype=torch.float64) * scales) @ rotation.T + 3.0
    basis = principal_directions(rows, 3)
    assert basis.shape == (3, 8)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3, dtype=torch.float64))
    assert torch.all((basis * rotation.T[:3]).sum(dim=1).abs() > 0.99)  # = the top 3 axes, up to sign


def test_cma_es_lowers_the_loss_on_a_fixed_batch(make_method, images):
    # every generation sees the same image, timestep, noise and prompt: a fixed objective
    method, components, _ = make_method()
    assert method.subspace_dim == 32  # min(256, the tiny model's embedding dim)
    first = generation(method, images, 0, seed_step=0)
    for step in range(1, 5):
        last = generation(method, images, step, seed_step=0)
    assert last["loss"] < first["loss"] and last["best_loss"] <= first["best_loss"]
    assert method.record_extras()["forward_passes_per_step"] == 6
    for name in ("unet", "vae", "text_encoder"):
        assert all(p.grad is None and not p.requires_grad for p in getattr(components, name).parameters())


@pytest.mark.parametrize("protocol", ["ours", "official"])
def test_cma_state_survives_checkpoint_and_restore(make_method, images, protocol):
    settings = ("method.popsize=3", "method.repeats=1")
    straight, _, _ = make_method(*settings, protocol=protocol)
    for step in range(2):
        generation(straight, images, step)
    first, _, _ = make_method(*settings, protocol=protocol)
    generation(first, images, 0)
    buffer = io.BytesIO()
    torch.save(first.checkpoint(), buffer)  # what benchmark.train writes
    buffer.seek(0)
    resumed, _, _ = make_method(*settings, protocol=protocol)
    resumed.restore(torch.load(buffer, weights_only=False))
    assert torch.equal(resumed.state_dict()["<sks>"], first.state_dict()["<sks>"])
    generation(resumed, images, 1)
    assert (resumed.es.mean == straight.es.mean).all() and resumed.es.sigma == straight.es.sigma
    assert torch.equal(resumed.state_dict()["<sks>"], straight.state_dict()["<sks>"])


def test_official_protocol_scores_all_images_x_repeats_with_fresh_noise_and_shared_timesteps(
    make_method, images
):
    method, components, _ = make_method("method.popsize=2", "method.repeats=2", protocol="official")
    calls = []
    components.unet.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].clone(), args[1].clone())), with_kwargs=False
    )
    generation(method, images, 0)
    n = len(images)
    assert sum(sample.shape[0] for sample, _ in calls) == 2 * n * 2 == method.forward_passes_per_step()
    per_candidate = len(calls) // 2
    assert all(torch.equal(t, calls[0][1][: len(t)]) for _, t in calls)  # one timestep per position
    first, second = calls[0][0], calls[per_candidate][0]  # the two candidates' first batches
    assert first.shape == second.shape and not torch.equal(first, second)  # fresh draws per candidate


def test_official_protocol_keeps_the_best_candidate_of_the_last_generation(make_method, images, tiny_cfg):
    method, components, cfg = make_method("method.popsize=3", "method.repeats=1", protocol="official")
    told = []
    tell = method.es.tell
    method.es.tell = lambda candidates, losses: (told.append((candidates, losses)), tell(candidates, losses))[
        1
    ]
    for step in range(2):
        generation(method, images, step)
    candidates, losses = told[-1]
    best = method.token_from(candidates[int(np.argmin(losses))]).to(components.text_encoder.dtype)
    assert torch.equal(method.state_dict()["<sks>"][0], best)
    assert not torch.equal(best, method.token_from(method.es.mean).to(best.dtype))  # not the CMA-ES mean
    vocabulary = models.load_components(cfg.model).text_encoder.get_input_embeddings().weight.double()
    torch.testing.assert_close(method.offset, vocabulary.mean(dim=0))  # PCA.inverse_transform's mean


def _image(pipeline, prompt):
    out = pipeline(
        prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    return torch.from_numpy(out.images[0])


def test_artifact_is_a_diffusers_token_file_that_changes_the_output(make_method, images, tmp_path):
    method, _, cfg = make_method()
    initial = method.state_dict()["<sks>"].clone()
    generation(method, images, 0)
    artifact = load_file(str(method.save_artifact(tmp_path)))
    assert list(artifact) == ["<sks>"] and artifact["<sks>"].shape == (1, 32)
    assert not torch.equal(artifact["<sks>"], initial)
    trained, untrained = models.load_pipeline(cfg.model), models.load_pipeline(cfg.model)
    GradientFreeTI(method.cfg).apply(trained, artifact)
    GradientFreeTI(method.cfg).apply(untrained, {"<sks>": initial})
    row = trained.tokenizer.convert_tokens_to_ids("<sks>")
    assert torch.equal(trained.text_encoder.get_input_embeddings().weight[row], artifact["<sks>"][0])
    assert not torch.allclose(_image(trained, "a photo of <sks>"), _image(untrained, "a photo of <sks>"))


@pytest.mark.parametrize(
    "override",
    [
        "method.popsize=1",
        "method.sigma=0",
        "method.subspace_dim=0",
        "method.quantize=int3",
        "method.T_U=2000",
        "method.precision=fp8",
        "method.protocol=feizc",
        "method.repeats=0",
    ],
)
def test_bad_settings_are_config_errors(tiny_cfg, override):
    with pytest.raises(ConfigError):
        method_config(tiny_cfg("method=gfti", override))


def test_run_writes_a_complete_record(tiny_cfg):
    record = run(
        tiny_cfg("method=gfti", "subject=dog6", "method.popsize=2", "method.repeats=1", "train.max_steps=2")
    )
    assert set(REQUIRED_FIELDS) <= set(record) and record["status"] == "ok"
    assert record["method.protocol"] == "official"  # the default: Table 1's protocol
    assert record["train_steps"] == 2 and record["forward_passes_per_step"] == 2 * 5  # x 5 dog6 images
    assert record["subspace_dim"] == 32 and record["trainable_params"] == 32
    assert record["clip_i"] is not None and record["artifact_bytes"] > 0

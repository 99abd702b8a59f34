"""Cached latents (``method.cache_latents``): each image's VAE posterior is encoded once before
step 0, the VAE leaves training, and the token after N steps is bit-identical to encoding in
every step (CPU, batch 1). At batch > 1 the VAE encodes the batch together, whose convolutions
may round differently from one image at a time: equal within the dtype's tolerance only."""

from __future__ import annotations

import pytest
import torch

from benchmark import data, models
from benchmark.train import step_generator, train
from methods.common.diffusion import encode_latents
from methods.common.latent_cache import LatentCache
from tests.conftest import set_up_method


@pytest.fixture
def images(dataset_root):
    return data.load_images(data.subject_image_paths(dataset_root, data.get_subject("dog6")), 64)


def trained_token(tiny_cfg, images, tmp_path, *overrides):
    cfg = tiny_cfg(*overrides)
    method = set_up_method(cfg, images)
    train(method, images, 3, method.cfg.batch_size, 0, tmp_path, torch.device("cpu"), progress=False)
    artifact = method.state_dict()  # SDXL: {"clip_l": row, "clip_g": row}
    return artifact.get(method.cfg.placeholder_token, torch.cat(list(artifact.values()), dim=1)), method.c


@pytest.mark.parametrize(
    "method",
    [
        ("method=zoodip",),  # fp16, the paper's precision
        ("method=gfti", "method.popsize=2", "method.repeats=1"),  # fewer passes: the same check
        ("method=ti",),
    ],
    ids=["zoodip", "gfti", "ti"],
)
def test_token_after_three_steps_is_bit_identical_with_and_without_the_cache(
    tiny_cfg, images, tmp_path, method
):
    cached, components = trained_token(tiny_cfg, images, tmp_path / "a", *method, "method.cache_latents=true")
    encoded, _ = trained_token(tiny_cfg, images, tmp_path / "b", *method, "method.cache_latents=false")
    assert torch.equal(cached, encoded)
    assert list(components.vae.parameters()) == []  # released: training does not need it


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])
def test_zoodip_token_is_bit_identical_with_every_memory_option_on_or_off(tiny_cfg, images, tmp_path, model):
    on = ("method.cache_latents=true", "method.compact_vocabulary=true")
    off = ("method.cache_latents=false", "method.compact_vocabulary=false")
    lean, components = trained_token(tiny_cfg, images, tmp_path / "a", f"model={model}", "method=zoodip", *on)
    full, _ = trained_token(tiny_cfg, images, tmp_path / "b", f"model={model}", "method=zoodip", *off)
    assert torch.equal(lean, full)
    for encoder in components.text_encoders:  # SDXL: both vocabularies compacted
        assert encoder.get_input_embeddings().weight.shape[0] < 100  # of 49,409


def test_a_flipped_image_samples_the_posterior_of_its_mirror_image(tiny_cfg, images):
    components = models.load_components(tiny_cfg("method=zoodip").model)
    cache = LatentCache(components.vae, images)
    index, flipped = torch.tensor([2, 0]), torch.tensor([True, False])
    pixels = torch.stack([images[2].flip(-1), images[0]])
    sampled = cache.sample({"image_index": index, "flipped": flipped}, step_generator(0, 5))
    # a batch of one at a time: how the cache encodes each image
    encoded = [encode_latents(components.vae, p[None], step_generator(0, 5)) for p in pixels]
    assert torch.equal(sampled[0], encoded[0][0])
    reference = encode_latents(components.vae, pixels, step_generator(0, 5))
    torch.testing.assert_close(sampled, reference)  # same draws; a batch encodes within fp tolerance
    assert not torch.equal(sampled[0], cache.sample({"image_index": index[:1]}, step_generator(0, 5))[0])

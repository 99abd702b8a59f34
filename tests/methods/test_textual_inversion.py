"""Textual Inversion on the tiny model: only the new token's row learns; the artifact is a
diffusers textual-inversion file that changes a stock pipeline's output."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from benchmark import data, models
from benchmark.config import method_config
from benchmark.train import train
from methods.common.base import ConfigError
from methods.ti import TextualInversion


def _image(pipeline, prompt):
    out = pipeline(
        prompt,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return torch.from_numpy(out.images[0])


@pytest.fixture
def trained_ti(tiny_cfg, dataset_root, tmp_path):
    cfg = tiny_cfg("method=ti", "method.lr=0.05", "method.steps=6")
    method_cfg = method_config(cfg)
    subject = data.get_subject("dog6")
    images = data.load_images(data.subject_image_paths(dataset_root, subject), method_cfg.resolution)
    components = models.load_components(cfg.model)
    method = TextualInversion(method_cfg)
    method.setup(components, subject)
    initial = components.text_encoder.get_input_embeddings().weight.detach().clone()
    result = train(method, images, 6, 1, 0, tmp_path, torch.device("cpu"), progress=False)
    return cfg, method, components, initial, result, tmp_path


def test_only_the_token_row_learns(trained_ti):
    cfg, method, components, initial, result, _ = trained_ti
    assert result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))
    after = components.text_encoder.get_input_embeddings().weight.detach()
    moved = (after != initial).any(dim=1).nonzero().flatten().tolist()
    assert moved == [method.token_id]
    fresh = models.load_components(cfg.model)
    for name in ("unet", "vae"):
        for (k, a), b in zip(
            getattr(components, name).state_dict().items(), getattr(fresh, name).state_dict().values()
        ):
            assert torch.equal(a, b), f"{name}.{k} changed"
    text_fresh = fresh.text_encoder.state_dict()
    for k, v in components.text_encoder.state_dict().items():
        if "token_embedding" not in k:
            assert torch.equal(v, text_fresh[k]), k


def test_artifact_loads_into_stock_pipeline_and_changes_output(trained_ti):
    cfg, method, _, initial, _, run_dir = trained_ti
    path = method.save_artifact(run_dir)
    artifact = load_file(str(path))
    assert list(artifact) == ["<sks>"] and artifact["<sks>"].shape == (1, initial.shape[1])
    assert path.stat().st_size < 10_000  # one vector of 32 floats + header

    trained = models.load_pipeline(cfg.model)
    method.apply(trained, artifact)
    untrained = models.load_pipeline(cfg.model)
    method.apply(untrained, {"<sks>": initial[method.token_id : method.token_id + 1]})
    row = trained.tokenizer.convert_tokens_to_ids("<sks>")
    assert torch.equal(trained.text_encoder.get_input_embeddings().weight[row], artifact["<sks>"][0])
    prompt = "a photo of <sks>"
    assert not torch.allclose(_image(trained, prompt), _image(untrained, prompt))


def test_placeholder_already_in_vocabulary_is_refused(tiny_cfg):
    cfg = tiny_cfg("method=ti", "method.placeholder_token=dog")
    components = models.load_components(cfg.model)
    with pytest.raises(ConfigError, match="'dog'"):
        TextualInversion(method_config(cfg)).setup(components, data.get_subject("dog6"))

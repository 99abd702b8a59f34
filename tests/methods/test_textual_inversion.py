"""Textual Inversion on the tiny model: only the new token's row learns; the artifact is a
diffusers textual-inversion file that changes a stock pipeline's output."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from benchmark import data, models
from benchmark.config import method_config
from benchmark.train import CHECKPOINT_NAME, save_checkpoint, train
from methods.common.base import ConfigError, Method
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


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])  # SDXL: a row in each of two matrices
def test_a_checkpoint_holds_the_token_rows_and_resumes_bit_identically(
    model, tiny_cfg, dataset_root, tmp_path
):
    cfg = tiny_cfg("method=ti", "method.lr=0.05", f"model={model}")
    method_cfg = method_config(cfg)
    subject = data.get_subject("dog6")
    images = data.load_images(data.subject_image_paths(dataset_root, subject)[:2], method_cfg.resolution)

    def fresh():
        method = TextualInversion(method_cfg)
        method.setup(models.load_components(cfg.model), subject)
        return method

    def train_to_step_3(method, run_dir, **kwargs):
        return train(method, images, 3, 1, 0, run_dir, torch.device("cpu"), progress=False, **kwargs)

    def write_full_matrix_checkpoint(steps_done):  # the format of earlier versions, at the same step
        if steps_done == 2:
            full = SimpleNamespace(checkpoint=lambda: Method.checkpoint(straight))
            save_checkpoint(tmp_path / "full" / CHECKPOINT_NAME, 2, full, 0.0)

    straight = fresh()  # leaves the checkpoint of step 2 in both formats, runs on to step 3
    (tmp_path / "full").mkdir()
    train_to_step_3(straight, tmp_path / "rows", checkpoint_every=2, after_step=write_full_matrix_checkpoint)

    # the token's row and its two AdamW moments, plus torch.save's headers; the full matrix and its
    # moments were 19 MB on the tiny model (455 MB at SD1.5)
    row_bytes = sum(table[0].numel() * table.element_size() for table in straight.tables)
    assert (tmp_path / "rows" / CHECKPOINT_NAME).stat().st_size < 3 * row_bytes + 4_000 * len(straight.tables)
    # the dropped rows' moments are not zero (the prompts' words get gradients): the resume below
    # is exact because those rows are put back after every step, not because they hold nothing
    untrained_moments = straight.optimizer.state[straight.embeddings]["exp_avg"].ne(0).any(dim=1)
    assert untrained_moments.sum() > 1

    for checkpoint_format in ("rows", "full"):
        resumed = fresh()
        assert train_to_step_3(resumed, tmp_path / checkpoint_format).resumed_from == 2
        for resumed_table, table in zip(resumed.tables, straight.tables, strict=True):
            assert torch.equal(resumed_table, table), checkpoint_format  # every row
        for key, value in straight.state_dict().items():
            assert torch.equal(resumed.state_dict()[key], value), (checkpoint_format, key)


def test_placeholder_already_in_vocabulary_is_refused(tiny_cfg):
    cfg = tiny_cfg("method=ti", "method.placeholder_token=dog")
    components = models.load_components(cfg.model)
    with pytest.raises(ConfigError, match="'dog'"):
        TextualInversion(method_config(cfg)).setup(components, data.get_subject("dog6"))

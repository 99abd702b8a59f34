"""Custom Diffusion and peft's LoHa, LoKr, OFT, BOFT, VeRA on the tiny model: what trains and what
stays frozen, the artifact reloaded into a stock pipeline (merged: stock layers, the trained
model's outputs), merged against unmerged, and bad knobs."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file

from benchmark import data, models
from benchmark.config import method_config
from benchmark.train import train
from methods.common.base import ConfigError
from methods.common.peft_adapters import attach
from methods.common.registry import method_class
from tests.conftest import OnDemand, compose
from tests.tolerance import assert_close_up_to_reordering, assert_effect_dwarfs_tolerance

PEFT = ("loha", "lokr", "oft", "boft", "vera")
METHODS = (*PEFT, "custom_diffusion")
# learning rates that move the tiny model visibly in two steps
FAST_LR = {
    "loha": "1e-1", "lokr": "5e-2", "oft": "1e-2", "boft": "1e-2", "vera": "1", "custom_diffusion": "1e-2",
}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_root):
    """{name: (cfg, method, components, state before training)} after two steps on dog6."""

    def make(name):
        tmp = tmp_path_factory.mktemp(name)
        cfg = compose([
            "model=tiny", f"data.root={dataset_root}", f"paths.results={tmp}", "train.progress=false",
            "train.profile_steps=0", f"method={name}", f"method.lr={FAST_LR[name]}",
        ])  # fmt: skip
        method_cfg = method_config(cfg)
        subject = data.get_subject("dog6")
        images = data.load_images(data.subject_image_paths(dataset_root, subject), method_cfg.resolution)
        components = models.load_components(cfg.model)
        method = method_class(name)(method_cfg)
        method.setup(components, subject)
        before = {
            part: {k: v.detach().clone() for k, v in getattr(components, part).state_dict().items()}
            for part in ("unet", "text_encoder", "vae")
        }
        before["params"] = {k: v.detach().clone() for k, v in method.trainable_parameters().items()}
        train(method, images, 2, 1, 0, tmp, torch.device("cpu"), progress=False)
        return cfg, method, components, before

    return OnDemand(make)


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([120, 870]), torch.randn(2, 77, 32, generator=g)


@torch.no_grad()
def unet_out(unet):
    return unet.eval()(*unet_inputs()).sample


@pytest.mark.parametrize("name", METHODS)
def test_the_method_s_tensors_train_and_the_rest_stays_bit_identical(name, trained):
    _, method, components, before = trained[name]
    params = method.trainable_parameters()
    for key, value in params.items():
        moved = value.detach() != before["params"][key]
        assert moved.any(), f"{key} did not train"
        if key.startswith("token_embedding"):  # only the modifier token's row of the matrix
            (rows,) = moved.any(dim=1).nonzero(as_tuple=True)
            assert rows.tolist() == [method.rows.token_ids[0]]
    trainable = {id(p) for p in params.values()}
    for part in ("unet", "text_encoder", "vae"):
        module = getattr(components, part)
        for key, value in module.state_dict(keep_vars=True).items():
            if id(value) not in trainable:
                assert torch.equal(value, before[part][key]), f"frozen {part}.{key} changed"
    if name == "custom_diffusion":  # K/V trained beside attn2's own (frozen) projections, attn1 untouched
        assert all(".attn2.processor." in k for k in params if not k.startswith("token_embedding"))


@pytest.mark.parametrize("name", METHODS)
def test_the_artifact_merges_into_a_stock_pipeline_as_the_trained_model(name, trained, tmp_path):
    cfg, method, components, _ = trained[name]
    artifact = load_file(str(method.save_artifact(tmp_path)))
    assert method.artifact_filename.endswith(".safetensors")
    applied = models.load_pipeline(cfg.model)
    stock_types = {type(m) for m in applied.unet.modules()}
    method_class(name)(method.cfg).apply(applied, artifact)  # a fresh instance: apply needs only cfg
    # merged: the stock U-Net's layers and processors, no adapter left (no inference overhead)
    assert {type(m) for m in applied.unet.modules()} == stock_types
    assert all(isinstance(p, AttnProcessor2_0) for p in applied.unet.attn_processors.values())
    trained_out = unet_out(components.unet)
    assert_close_up_to_reordering(unet_out(applied.unet), trained_out)
    assert_effect_dwarfs_tolerance(unet_out(models.load_pipeline(cfg.model).unet), trained_out)
    if name == "custom_diffusion":  # the modifier token came along
        token_id = applied.tokenizer.convert_tokens_to_ids("<new1>")
        row = applied.text_encoder.get_input_embeddings().weight[token_id]
        assert torch.equal(row, method.rows.read())


@pytest.mark.parametrize("name", PEFT)
def test_merged_equals_unmerged(name, trained, tmp_path):
    """fp32: the merge folds the adapter into the weight, a reordering of the same products."""
    cfg, method, _, _ = trained[name]
    artifact = method.state_dict()
    unmerged = models.load_pipeline(cfg.model)
    attach(unmerged.unet, method.peft_config(), artifact)
    merged = models.load_pipeline(cfg.model)
    method.apply(merged, artifact)
    assert_close_up_to_reordering(unet_out(merged.unet), unet_out(unmerged.unet))


def test_custom_diffusion_loads_the_diffusers_way_and_folds_to_the_same_output(trained):
    """``load_attn_procs`` alone (Custom Diffusion processors) gives what the folded stock U-Net gives."""
    from methods.custom_diffusion import SELF_ATTENTION

    cfg, method, _, _ = trained["custom_diffusion"]
    artifact = method.state_dict()
    by_processors = models.load_pipeline(cfg.model)
    kv = {k: v for k, v in artifact.items() if "custom_diffusion" in k}
    kv |= {n: {} for n in by_processors.unet.attn_processors if n.endswith(SELF_ATTENTION)}
    by_processors.unet.load_attn_procs(kv, _pipeline=by_processors)
    assert not isinstance(next(iter(by_processors.unet.attn_processors.values())), AttnProcessor2_0)
    folded = models.load_pipeline(cfg.model)
    method.apply(folded, artifact)
    assert_close_up_to_reordering(unet_out(folded.unet), unet_out(by_processors.unet))


@pytest.mark.parametrize(
    ("name", "override", "message"),
    [
        ("loha", "method.rank=0", r"method.rank=0 must be > 0"),
        ("vera", "method.rank=-1", r"method.rank=-1 must be > 0"),
        ("oft", "method.blocks=0", r"method.blocks=0 must be > 0"),
        ("boft", "method.blocks=8", r"set exactly one of them"),
        ("lokr", "method.decompose_factor=0", r"method.decompose_factor=0 must be -1"),
        ("custom_diffusion", "method.identifier='a b'", r"method.identifier='a b' is the modifier token"),
    ],
)
def test_a_bad_knob_is_a_one_line_error(name, override, message, tiny_cfg):
    with pytest.raises(ConfigError, match=message) as error:
        method_config(tiny_cfg(f"method={name}", override))
    assert "\n" not in str(error.value)


def test_boft_refuses_the_one_factor_fallback_of_peft_without_its_cuda_extension(tiny_cfg):
    cfg = tiny_cfg("method=boft", "method.block_size=0", "method.blocks=4", "method.butterfly_factor=2")
    method = method_class("boft")(method_config(cfg))
    from peft.tuners.boft import layer

    if layer.get_fbd_cuda() is not None:
        pytest.skip("peft's BOFT CUDA extension loads here: two factors are built")
    with pytest.raises(ConfigError, match=r"method.butterfly_factor=2 but peft built \[1\]"):
        method.setup(models.load_components(cfg.model), data.get_subject("dog6"))


def test_table1_reports_a_method_beyond_the_papers_beside_the_paper_methods(tmp_path, dataset_root):
    """A row under its display name, marked, its paper columns empty (no paper row); a paper
    method's filled and unmarked."""
    from benchmark.report.cli import write_report
    from benchmark.report.tables import build_report
    from tests.conftest import run_sweep_in_process

    args = [
        "experiment=table1", "method=loha,ti", "subject=dog6", "model=tiny", f"data.root={dataset_root}",
        f"paths.results={tmp_path}", "train.progress=false", "train.profile_steps=0",
    ]  # fmt: skip
    assert {r["status"] for r in run_sweep_in_process(args)} == {"ok"}
    report = build_report(args)
    table = report.table.set_index("method")
    assert table.loc["loha", ["clip_t_paper", "clip_i_paper", "dino_paper"]].isna().all()
    assert table.loc["ti", ["clip_t_paper", "clip_i_paper", "dino_paper"]].notna().all()
    markdown = next(p for p in write_report(report) if p.name == "table.md").read_text()
    (row,) = [line for line in markdown.splitlines() if line.startswith("| LoHa")]
    assert "| — |" in row and row.startswith("| LoHa ‡")  # marked as beyond the papers
    (ti,) = [line for line in markdown.splitlines() if line.startswith("| TI")]
    assert "‡" not in ti
    assert "‡: a method beyond the papers" in markdown

"""SD2.1 and SDXL: the families' configs, their tiny models, every method training on
them, its artifact applied to the family's stock pipeline, and the memory predictor on them."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from benchmark import data, models
from benchmark.config import method_config, training_dtype
from benchmark.generate import eval_prompts
from benchmark.memory.estimate import estimate
from benchmark.memory.tracker import allocator_bytes
from benchmark.models.tokenizer import clip_tokenizer
from benchmark.train import step_generator
from methods.common.conditioning import encode_text, unet_prediction
from methods.common.registry import method_class, method_names
from tests.conftest import compose

TINY_FAMILIES = ("tiny_sd21", "tiny_sdxl")


def image(pipeline, prompt: str) -> torch.Tensor:
    return pipeline(
        prompt, num_inference_steps=2, guidance_scale=3.0, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


@pytest.mark.parametrize(
    ("model", "resolution", "pipeline", "prediction"),
    [
        ("sd21", 768, StableDiffusionPipeline, "v_prediction"),
        ("sdxl", 1024, StableDiffusionXLPipeline, "epsilon"),
    ],
)
def test_each_family_sets_its_native_resolution_and_target(tiny_cfg, model, resolution, pipeline, prediction):
    for name in method_names():
        cfg = compose([f"model={model}", f"method={name}"])
        assert method_config(cfg).resolution == resolution, name
    selective = method_config(compose([f"model={model}", "method=selective"]))
    assert (selective.low_resolution, selective.high_resolution) == (resolution // 2, resolution)
    tiny = models.load_components(tiny_cfg(f"model=tiny_{model}").model)
    assert tiny.noise_scheduler.config.prediction_type == prediction
    assert isinstance(models.build_pipeline(tiny), pipeline)


@pytest.mark.parametrize(
    ("model", "counts"),
    [
        ("sd21_arch", {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}),
        (
            "sdxl_arch",
            {
                "unet": 2_567_463_684,
                "text_encoder": 123_060_480,
                "text_encoder_2": 694_659_840,
                "vae": 83_653_863,
            },
        ),  # fmt: skip
    ],
)
def test_arch_models_have_the_published_parameter_counts_and_run(model, counts):
    """The Hub repos' parameter counts, and one U-Net forward at the native latent size, fake."""
    cfg = compose([f"model={model}"])
    with FakeTensorMode():
        nets = models.build_from_config(cfg.model, torch.float16)
        params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets._asdict().items() if m}
        assert params == counts
        components = models.Components(
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer() if nets.text_encoder_2 else None,
            noise_scheduler=None, device=torch.device("cpu"), dtype=torch.float16, **nets._asdict(),
        )  # fmt: skip
        latent = cfg.model.resolution // 8
        z = torch.randn(1, 4, latent, latent, dtype=torch.float16)
        cond = encode_text(components, ["a photo of a dog"])
        assert cond.hidden.shape[-1] == components.unet.config.cross_attention_dim
        assert unet_prediction(components.unet, z, torch.tensor([500]), cond).shape == z.shape


def test_a_fake_build_has_the_real_builds_tensors_as_fake_cpu_tensors(tiny_cfg):
    """Under fake tensors (memory prediction) the networks are built on the meta device, with
    no initialisation kernels, then made fake: the same tensors as a real build."""

    def tensors(module):
        named = [*module.named_parameters(), *module.named_buffers()]
        return {k: (tuple(v.shape), v.dtype, v.requires_grad) for k, v in named}

    model_cfg = tiny_cfg("model=tiny_sdxl").model
    real = models.build_from_config(model_cfg, torch.float16)
    with FakeTensorMode():
        fake = models.build_from_config(model_cfg, torch.float16)
    for name, real_net, fake_net in zip(real._fields, real, fake):
        assert tensors(fake_net) == tensors(real_net), name
        named = [*fake_net.named_parameters(), *fake_net.named_buffers()]
        assert all(isinstance(v, FakeTensor) and v.device.type == "cpu" for _, v in named), name


@pytest.mark.parametrize("model", ["sd21", "sdxl"])
def test_missing_weights_fail_at_once_with_one_line(model, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = compose([f"model={model}", "model.hub_id=zo-bench-tests/no-such-model"])
    with pytest.raises(models.WeightsUnavailable) as err:
        models.load_components(cfg.model)
    assert "\n" not in str(err.value) and "model.path=" in str(err.value)


def test_a_local_sdxl_folder_loads_both_text_encoders(tmp_path, tiny_cfg):
    """A saved SDXL pipeline folder (what `hf download` gives) loads through model.path."""
    tiny = models.load_components(tiny_cfg("model=tiny_sdxl").model)
    models.build_pipeline(tiny).save_pretrained(tmp_path / "sdxl")
    cfg = compose(["model=sdxl", f"model.path={tmp_path / 'sdxl'}"])
    loaded = models.load_components(cfg.model)
    for name in ("text_encoder", "text_encoder_2", "unet"):
        a, b = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    shutil.rmtree(tmp_path / "sdxl" / "text_encoder_2")  # a download without the second encoder
    with pytest.raises(models.WeightsUnavailable, match="text_encoder_2"):
        models.load_components(compose(["model=sdxl", f"model.path={tmp_path / 'sdxl'}"]).model)


@pytest.fixture(scope="module")
def stock_image():
    """The stock pipeline's image of (model, prompt), made once per module: the methods share
    two prompts per family (with the placeholder token or with the class noun)."""
    images = {}

    def get(model_cfg, prompt: str) -> torch.Tensor:
        key = (model_cfg.name, prompt)
        if key not in images:
            images[key] = image(models.load_pipeline(model_cfg), prompt)
        return images[key]

    return get


# GF-TI's official protocol scores popsize x images x repeats U-Net samples a generation (200
# here); what these tests check (family plumbing) needs two candidates of one repeat.
FEWER_PASSES = {"gfti": ("method.popsize=2", "method.repeats=1")}


@pytest.mark.parametrize("model", TINY_FAMILIES)
@pytest.mark.parametrize("name", method_names())
def test_method_trains_and_its_artifact_changes_the_stock_pipeline(tiny_cfg, stock_image, model, name):
    cfg = tiny_cfg(f"model={model}", f"method={name}", *FEWER_PASSES.get(name, ()))
    method_cfg, subject = method_config(cfg), data.get_subject("dog6")
    trainer = method_class(name)(method_cfg)
    trainer.setup(models.load_components(cfg.model, dtype=training_dtype(method_cfg)), subject)
    size, steps = method_cfg.resolution, 2
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trainer.precompute(images, 0, steps)
    before = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
    for step in range(steps):
        g = step_generator(0, step)
        index = torch.randint(len(images), (method_cfg.batch_size,), generator=g)
        loss = trainer.step({"pixel_values": images[index], "generator": g, "index": index}, step)["loss"]
        assert torch.isfinite(torch.as_tensor(loss))
    artifact = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
    assert any(not torch.equal(before[k], artifact[k]) for k in artifact), "training changed nothing"
    if trainer.token_only_prompts and model == "tiny_sdxl":  # diffusers' SDXL textual-inversion file
        assert {k: tuple(v.shape) for k, v in artifact.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}

    personalized = models.load_pipeline(cfg.model)
    applier = method_class(name)(method_cfg)
    applier.apply(personalized, artifact)
    prompt = eval_prompts(subject, applier, cfg.eval)[0].prompt
    result = image(personalized, prompt)
    assert torch.isfinite(result).all()
    assert not torch.equal(result, stock_image(cfg.model, prompt))


# Every method on SDXL, the family whose conditioning differs (two encoders, pooled text, size
# ids); SD2.1 differs from SD1.5 only in the target and the attention projection: one method.
@pytest.mark.parametrize(
    ("model", "name"), [("tiny_sdxl", name) for name in method_names()] + [("tiny_sd21", "ti")]
)
def test_every_method_is_predicted_under_fake_tensors(tiny_cfg, model, name):
    est = estimate(tiny_cfg(f"model={model}", f"method={name}", *FEWER_PASSES.get(name, ())))
    assert est.peak_bytes >= est.after_setup_bytes > 0 and est.fake
    assert sum(est.breakdown.values()) == est.peak_bytes


def test_sdxl_ti_prediction_counts_both_embedding_tables(tiny_cfg):
    """On SDXL, TI's AdamW holds two moments of both encoders' embedding matrices."""
    est = estimate(tiny_cfg("model=tiny_sdxl", "method=ti"))
    rows = 49409  # the CLIP vocabulary plus the new token, in both tokenizers
    tables = allocator_bytes(rows * 32 * 4) + allocator_bytes(rows * 48 * 4)
    assert est.breakdown["optimizer_state"] == 2 * tables + 2 * 512  # exp_avg, exp_avg_sq, steps
    assert est.breakdown["gradients"] == tables


@pytest.mark.parametrize(
    ("arm", "model", "resolution", "settings"),
    [
        ("sd21", "sd21", 768, {"mu": 1e-2, "lr": 1e-2, "T_L": 500, "steps": 30000}),
        ("sdxl", "sdxl", 1024, {"mu": 1e-2, "lr": 5e-3, "T_L": 700, "steps": 20000}),
    ],
)
def test_figS4_arms_run_zoodip_with_the_appendix_settings_per_model(arm, model, resolution, settings):
    cfg = compose(["experiment=figS4", f"+experiment/figS4={arm}"])
    method_cfg = method_config(cfg)
    assert (cfg.model.name, method_cfg.name, method_cfg.resolution) == (model, "zoodip", resolution)
    assert {k: getattr(method_cfg, k) for k in settings} == settings
    assert cfg.report.figures == ["gallery"]


def test_gallery_shows_one_image_per_prompt_of_each_finished_run(tmp_path):
    import pandas as pd
    from PIL import Image

    from benchmark.report.figures import PNG_DPI
    from benchmark.report.plots import GALLERY_PROMPTS, gallery

    runs = []
    for i, state in enumerate(["ok", "failed"]):
        run_dir = tmp_path / f"run{i}"
        (run_dir / "images").mkdir(parents=True)
        for p in range(GALLERY_PROMPTS):
            Image.new("RGB", (8, 8), (60 * p, 0, 0)).save(run_dir / "images" / f"p{p:02d}_000.png")
        runs.append({"model.name": f"m{i}", "subject": "dog6", "state": state, "path": str(run_dir)})
    report = type("Report", (), {"spec": {"rows": ["model.name"]}, "runs": pd.DataFrame(runs)})
    pdf, png = gallery(report, tmp_path)
    assert pdf.suffix == ".pdf" and pdf.exists()
    # 2.2 x 2.3 inches per image: one row of GALLERY_PROMPTS images (the failed run is left out)
    assert Image.open(png).size == (round(2.2 * GALLERY_PROMPTS * PNG_DPI), round(2.3 * PNG_DPI))


def test_memory_map_colours_each_cell_by_the_smallest_card_that_holds_peak_and_margin(tmp_path):
    from benchmark.memory.map import GIB, draw, markdown, memory_grid, smallest_gpu

    assert [smallest_gpu(g * GIB) for g in (6.9, 7.1, 22.9, 79.5)] == [8, 12, 24, None]
    csv = tmp_path / "predicted.csv"
    csv.write_text(
        "method,variant,model,predicted_peak_bytes\n"
        f"zoodip,,sdxl_arch,{4 * GIB}\nzoodip,,sd15_arch,{1 * GIB}\ndreambooth,,sdxl_arch,{60 * GIB}\n"
    )
    grid = memory_grid(csv)
    # methods in the CSV's (the sweep's) order, models in MODEL_ORDER
    assert list(grid.index) == ["zoodip", "dreambooth"] and list(grid.columns) == ["sd15_arch", "sdxl_arch"]
    table = markdown(grid)
    assert "| ZOODiP | 1.07 (8 GB) | 4.29 (8 GB) |" in table and "| DreamBooth | – | 64.42 (80 GB) |" in table
    assert draw(grid, tmp_path / "map.png").stat().st_size > 0


def test_memory_map_fits_by_the_device_level_figure_and_shows_the_compute(tmp_path):
    from benchmark.memory.map import GIB, markdown, memory_grid, smallest_gpu

    # 7.2 GiB allocator peak: with the 1 GiB margin a 12 GB card; its device-level 7.9 GiB fits 8 GB
    assert smallest_gpu(7.2 * GIB) == 12 and smallest_gpu(7.2 * GIB, 7.9 * GIB) == 8
    assert smallest_gpu(7.2 * GIB, 8.1 * GIB) == 12  # and a device figure above 8 GiB does not
    csv = tmp_path / "predicted.csv"
    csv.write_text(
        "method,variant,model,predicted_peak_bytes,predicted_device_bytes,predicted_train_flops\n"
        f"ti,,sd15_arch,{7.2 * GIB},{7.9 * GIB},2.5e17\nti,,sdxl_arch,{20 * GIB},,\n"
    )
    grid = memory_grid(csv)
    device, flops = memory_grid(csv, "predicted_device_bytes"), memory_grid(csv, "predicted_train_flops")
    assert "| TI | 7.73 · 8.48 (8 GB) · 250.0 PFLOP | 21.47 (24 GB) |" in markdown(grid, device, flops)

"""Hollowed Net (and the plain LoRA it builds on) on the tiny model: the hollowed forward fed by
stage-1 activations equals the full U-Net, the removed layers' weights are freed, and the LoRA
trained on the hollowed U-Net transfers to the stock one."""

from __future__ import annotations

import gc
import re
import weakref
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from benchmark import data, models
from benchmark.config import method_config
from benchmark.models import SD15_UNET
from benchmark.run import run
from benchmark.train import train
from methods.common.base import ConfigError
from methods.common.hollow_unet import boundary_activations, hollowed_forward, plan_removal, unet_layers
from methods.common.lora_io import load_unet_lora
from methods.common.registry import method_class
from methods.hollowed import downstream_lora_targets
from tests.conftest import run_sweep_in_process
from tests.tolerance import assert_close_up_to_reordering, assert_effect_dwarfs_tolerance

CPU = torch.device("cpu")


def make_method(tiny_cfg, dataset_root, *overrides):
    cfg = tiny_cfg(*overrides)
    method_cfg = method_config(cfg)
    subject = data.get_subject("dog6")
    images = data.load_images(data.subject_image_paths(dataset_root, subject), method_cfg.resolution)
    components = models.load_components(cfg.model)
    method = method_class(method_cfg.name)(method_cfg)
    method.setup(components, subject)
    return cfg, method, components, images


def run_steps(method, images, steps, run_dir, seed=0):
    method.precompute(images, seed, steps)
    return train(method, images, steps, 1, seed, run_dir, CPU, progress=False)


def random_inputs(seed=0, batch=2, size=8):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, size, size, generator=g),
        torch.tensor([10, 900][:batch]),
        torch.randn(batch, 77, 32, generator=g),
    )


def test_layers_are_counted_symmetrically_and_removed_from_the_middle():
    with torch.device("meta"):
        sd15 = unet_layers(UNet2DConditionModel(**SD15_UNET))
    assert (sd15.K, sd15.count) == (11, 23)  # 8 ResNet(+attn) units + 3 downsamplers a side, + mid
    tiny = unet_layers(models.build_from_config({"kind": "tiny"}).unet)
    assert tiny.count == 7
    assert plan_removal(tiny, 0).n_removed == 0
    p = plan_removal(tiny, 0.25)  # round(1.75) = 2: mid, then the deepest down layer
    assert p.removed_mid and p.removed_down == {3} and not p.removed_up and p.cached_skips == (3,)
    p = plan_removal(tiny, 0.5)  # round(3.5) = 4: mid, down 3, up 3, down 2
    assert p.removed_down == {2, 3} and p.removed_up == {3} and p.boundary_keys() == ("hidden", "skip2")
    previous = plan_removal(sd15, 0)
    for fraction in [i / 20 for i in range(1, 20)]:  # nested: more fraction only removes more
        plan = plan_removal(sd15, fraction)
        assert previous.removed_down <= plan.removed_down and previous.removed_up <= plan.removed_up
        assert abs(plan.n_removed - fraction * 23) <= 0.5
        previous = plan


def test_fraction_zero_hollowed_forward_is_the_full_unet():
    unet = models.build_from_config({"kind": "tiny"}).unet
    layers = unet_layers(unet)
    plan = plan_removal(layers, 0)
    for size in (8, 5):  # 5: diffusers forwards the upsample size
        z, t, text = random_inputs(size=size)
        assert boundary_activations(unet, layers, plan, z, t, text) == {}
        assert torch.equal(hollowed_forward(unet, layers, plan, z, t, text, {}), unet(z, t, text).sample)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
def test_hollowed_forward_on_cached_activations_reproduces_the_full_unet(
    tiny_cfg, dataset_root, fraction, tmp_path
):
    cfg, method, components, images = make_method(
        tiny_cfg,
        dataset_root,
        "method=hollowed",
        f"method.fraction={fraction}",
        f"method.cache_dir={tmp_path / 'cache'}",
    )
    method.precompute(images, seed=3, steps=2)  # stage 1, then the U-Net is hollowed and gets LoRA
    assert method.params and len(list((tmp_path / "cache").glob("hollowed-cache-*/*.safetensors"))) == 2
    full = models.load_components(cfg.model).unet  # the original U-Net, same weights
    for step in range(2):
        entry = method.cache.get(step, CPU)
        assert set(method.plan.boundary_keys()) < set(entry)
        text = method.text.expand(entry["z_t"].shape[0]).hidden  # SD1: hidden states alone
        with torch.no_grad():
            expected = full(entry["z_t"], entry["timesteps"], text).sample
            hollow = hollowed_forward(
                components.unet, method.layers, method.plan, entry["z_t"], entry["timesteps"], text, entry
            )
        assert_close_up_to_reordering(hollow, expected)
    with pytest.raises(RuntimeError, match="removed"):  # the stock forward cannot run any more
        components.unet(entry["z_t"], entry["timesteps"], text)
    folder = method.cache.directory
    del method
    gc.collect()
    assert not folder.exists()  # the disk cache goes with the run


def test_removed_layers_weights_are_freed_in_stage_two(tiny_cfg, dataset_root, tmp_path):
    _, method, components, images = make_method(
        tiny_cfg, dataset_root, "method=hollowed", "method.fraction=0.5", "method.cache=host"
    )
    unet = components.unet
    removed_prefixes = (
        "mid_block.",
        "down_blocks.1.resnets.0.",
        "down_blocks.0.downsamplers.0.",
        "up_blocks.0.resnets.0.",
    )
    removed = {n: weakref.ref(p) for n, p in unet.named_parameters() if n.startswith(removed_prefixes)}
    kept = {n: weakref.ref(p) for n, p in unet.named_parameters() if not n.startswith(removed_prefixes)}
    encoders = [weakref.ref(p) for m in (components.vae, components.text_encoder) for p in m.parameters()]
    n_removed = sum(r().numel() for r in removed.values())
    run_steps(method, images, 2, tmp_path)
    gc.collect()
    assert removed and all(r() is None for r in removed.values())  # freed: nothing holds them
    assert all(r() is not None for r in kept.values())
    assert not any(n.startswith(removed_prefixes) for n, _ in unet.named_parameters())
    assert all(r() is None for r in encoders)  # offload_encoders: stage 2 needs neither
    assert not [t for m in (components.vae, components.text_encoder) for t in (*m.parameters(), *m.buffers())]
    extras = method.record_extras()
    assert extras["hollowed_removed_unet_parameters"] == n_removed
    assert extras["hollowed_layers_removed"] == 4 and extras["cache_kind"] == "host"
    assert extras["cache_bytes"] == sum(
        v.numel() * v.element_size() for s in range(2) for v in method.cache.get(s, CPU).values()
    )


def test_fraction_zero_trains_exactly_like_plain_lora(tiny_cfg, dataset_root, tmp_path):
    """Stage 1 replays the loop's draws, so the cached samples are the ones LoRA would see."""
    states = {}
    for name, extra in (("lora", []), ("hollowed", ["method.fraction=0", "method.offload_encoders=false"])):
        _, method, _, images = make_method(tiny_cfg, dataset_root, f"method={name}", "method.lr=1e-2", *extra)
        run_steps(method, images, 3, tmp_path / name, seed=5)
        states[name] = method.state_dict()
    assert states["lora"].keys() == states["hollowed"].keys()
    for k, v in states["lora"].items():
        assert_close_up_to_reordering(states["hollowed"][k], v)


def _cached_and_live_loss(tiny_cfg, dataset_root, tmp_path, scope, k=3):
    """Stage 2's loss at step k (after k steps) on the cached boundary, and the same loss with
    the boundary computed live by the full U-Net carrying the same LoRA (the transferred model)."""
    cfg, method, components, images = make_method(
        tiny_cfg, dataset_root, "method=hollowed", "method.fraction=0.5", "method.lr=5e-2",
        f"method.lora_scope={scope}", "method.cache=host",
    )  # fmt: skip
    method.precompute(images, 0, k + 1)
    train(method, images, k, 1, 0, tmp_path / scope, CPU, progress=False)
    full = models.load_components(cfg.model).unet  # the original U-Net, same base weights
    live_params = method.prepare(SimpleNamespace(unet=full), None)  # + zero LoRA on removed layers
    assert set(method.params) <= set(live_params)
    with torch.no_grad():
        for name, p in method.params.items():
            live_params[name].copy_(p)
        entry = method.cache.get(k, CPU)
        z_t, t, target = entry["z_t"], entry["timesteps"], entry["target"]
        text = method.text.expand(z_t.shape[0]).hidden
        hollow = components.unet
        live_boundary = boundary_activations(full, method.layers, method.plan, z_t, t, text)
        cached = method.loss(
            hollowed_forward(hollow, method.layers, method.plan, z_t, t, text, entry), target
        )
        live = method.loss(
            hollowed_forward(hollow, method.layers, method.plan, z_t, t, text, live_boundary), target
        )
        transferred = method.loss(full(z_t, t, text).sample, target)
    return cached, live, transferred


def test_exact_scope_trains_the_loss_of_the_transferred_model(tiny_cfg, dataset_root, tmp_path):
    """lora_scope=exact: at step k > 0 the cached loss is the live one (fp32, same ops)."""
    cached, live, transferred = _cached_and_live_loss(tiny_cfg, dataset_root, tmp_path, "exact")
    torch.testing.assert_close(cached, live, rtol=1e-6, atol=0)
    torch.testing.assert_close(cached, transferred, rtol=1e-5, atol=0)


def test_all_scope_trains_against_stale_activations(tiny_cfg, dataset_root, tmp_path):
    """lora_scope=all (default): LoRA on kept down layers changes what crosses the cut, which
    the cache does not see, so the two losses part (what the exact test would catch)."""
    cached, live, transferred = _cached_and_live_loss(tiny_cfg, dataset_root, tmp_path, "all")
    assert abs(float(cached - live)) > 1e-4 * float(live)  # fp32 rounding is ~1e-7 relative
    torch.testing.assert_close(live, transferred, rtol=1e-5, atol=0)


def test_default_scope_puts_lora_on_every_kept_layer(tiny_cfg, dataset_root):
    """lora_scope=all (default): the attention projections of the kept down and up layers, none
    on a removed one (their modules are placeholders)."""
    _, method, _, images = make_method(
        tiny_cfg, dataset_root, "method=hollowed", "method.fraction=0.5", "method.cache=host"
    )
    assert method.cfg.lora_scope == "all"
    method.precompute(images, 0, 1)
    layers, plan = method.layers, method.plan
    blocks = {name.split(".attentions.")[0] for name in method.params}
    assert any(b.startswith("down_blocks.") for b in blocks) and any(
        b.startswith("up_blocks.") for b in blocks
    )
    attentions = [m for m in method.c.unet.modules() if hasattr(m, "to_q")]  # the kept ones
    assert plan.n_removed and attentions and all(hasattr(m.to_q, "lora_A") for m in attentions)
    exact = downstream_lora_targets(layers, plan)  # what lora_scope=exact targets
    assert any(not re.search(exact, name) for name in method.params)


def test_exact_scope_puts_lora_only_downstream_of_the_cut(tiny_cfg, dataset_root):
    _, method, _, images = make_method(
        tiny_cfg, dataset_root, "method=hollowed", "method.fraction=0.5", "method.cache=host",
        "method.lora_scope=exact",
    )  # fmt: skip
    method.precompute(images, 0, 1)
    layers, plan = method.layers, method.plan
    kept_up = [layers.up[k] for k in range(layers.K + 1) if k not in plan.removed_up]
    prefixes = tuple(f"up_blocks.{u.block}.attentions.{u.unit}." for u in kept_up)
    assert method.params and all(name.startswith(prefixes) for name in method.params)
    with_lora = {name.split(".attentions.")[0] + "." + name.split(".")[3] for name in method.params}
    assert len(with_lora) == sum(hasattr(method.c.unet.up_blocks[u.block], "attentions") for u in kept_up)


def test_resumed_run_ends_bit_identical(tiny_cfg, dataset_root, tmp_path):
    """A resumed run redoes stage 1 (deterministic) and continues from the checkpoint."""
    finals = []
    for _ in range(2):  # the second run finds the first one's step-2 checkpoint and resumes there
        _, method, _, images = make_method(tiny_cfg, dataset_root, "method=hollowed", "method.lr=1e-2")
        method.precompute(images, 0, 4)
        result = train(method, images, 4, 1, 0, tmp_path, CPU, checkpoint_every=2, progress=False)
        finals.append((result.resumed_from, method.state_dict()))
    assert [r for r, _ in finals] == [0, 2]
    for k, v in finals[0][1].items():
        assert torch.equal(finals[1][1][k], v), k


def _image(pipeline, prompt="a photo of sks dog"):
    out = pipeline(
        prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    return torch.from_numpy(out.images[0])


def test_lora_trained_on_hollowed_unet_loads_into_the_full_unet(tiny_cfg, dataset_root, tmp_path):
    cfg, method, _, images = make_method(
        tiny_cfg, dataset_root, "method=hollowed", "method.fraction=0.5", "method.lr=5e-2"
    )
    run_steps(method, images, 3, tmp_path)
    artifact = load_file(str(method.save_artifact(tmp_path)))
    assert artifact and all(k.startswith("unet.") for k in artifact)
    assert not any(
        k.startswith(("unet.mid_block.", "unet.up_blocks.0.")) for k in artifact
    )  # removed: no LoRA

    stock = models.load_pipeline(cfg.model)
    fused = models.load_pipeline(cfg.model)
    method_class("hollowed")(method.cfg).apply(fused, artifact)  # a fresh method: apply uses only cfg
    attached = models.load_pipeline(cfg.model)
    load_unet_lora(attached, artifact)
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())  # fused: no inference overhead
    fused_image = _image(fused)
    attached_image = _image(attached)
    assert_close_up_to_reordering(fused_image, attached_image)
    assert_effect_dwarfs_tolerance(_image(stock), attached_image)  # the LoRA changed the image
    unchanged = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(fused.unet.state_dict()[unchanged], stock.unet.state_dict()[unchanged])


def test_lora_any_rank_trains_only_lora(tiny_cfg, dataset_root, tmp_path):
    cfg, method, components, images = make_method(
        tiny_cfg, dataset_root, "method=lora", "method.rank=1", "method.lr=1e-2"
    )
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    run_steps(method, images, 2, tmp_path)
    attention_projections = [
        m for n, m in components.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    ]
    expected = sum(m.in_features + m.out_features for m in attention_projections)  # rank 1: r * (in + out)
    assert sum(p.numel() for p in method.trainable_parameters().values()) == expected
    after = components.unet.state_dict()
    for k, v in before.items():
        if "lora_" not in k:
            assert torch.equal(after[k], v), f"frozen {k} changed"
        elif "lora_B" in k:
            assert not torch.equal(after[k], v), f"{k} did not train"


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.fraction=1.0", "method.fraction=1.0"),
        ("method.fraction=-0.1", "method.fraction=-0.1"),
        ("method.cache=gpu", "'gpu'"),
        ("method.lora_scope=down", "lora_scope='down'"),
    ],
)
def test_bad_hollowed_config_is_refused(tiny_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        method_config(tiny_cfg("method=hollowed", override))


def test_lora_rank_below_one_is_refused(tiny_cfg):
    with pytest.raises(ConfigError, match="method.rank=0"):
        method_config(tiny_cfg("method=lora", "method.rank=0"))


@pytest.mark.integration
def test_lora_run_writes_a_record(tiny_cfg):
    record = run(tiny_cfg("method=lora", "method.rank=2"))
    assert record["status"] == "ok", record["error"]
    assert record["train_steps"] == 4 and record["artifact_bytes"] > 0 and record["clip_t"] is not None


@pytest.mark.integration
def test_fraction_sweep_writes_complete_records(tmp_path, dataset_root):
    """The sweep's runs in this process (tests/sweep/test_sweep.py runs `python -m benchmark -m`)."""
    records = run_sweep_in_process(
        ["method=hollowed", "method.fraction=0,0.25,0.5", "model=tiny", "method.steps=2",
         f"data.root={dataset_root}", f"paths.results={tmp_path / 'results'}", "train.progress=false",
         "train.profile_steps=0"]
    )  # fmt: skip
    assert sorted(r["method.fraction"] for r in records) == [0, 0.25, 0.5]
    from benchmark.records import REQUIRED_FIELDS

    for r in records:
        assert set(REQUIRED_FIELDS) <= set(r) and r["status"] == "ok" and r["train_steps"] == 2
        assert r["cache_bytes"] > 0 and r["artifact_bytes"] > 0
    removed = {r["method.fraction"]: r["hollowed_removed_unet_parameters"] for r in records}
    assert removed[0] == 0 < removed[0.25] < removed[0.5]

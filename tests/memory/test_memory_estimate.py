"""The memory predictor (benchmark/memory/estimate.py): exact on a model small enough to count
by hand, identical on fake and real tensors, and able to run every registered method's code."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmark.memory.estimate import estimate
from benchmark.memory.tracker import allocator_bytes, tagging_hooks, tracking
from methods.common.registry import method_names

MB = 2**20  # the toy's tensors are whole multiples of the allocator's 512-byte blocks


def train_toy(fake: bool):
    """W (256 x 256, fp32) trained by AdamW for two steps on x (1024 x 256); loss = sum(tanh(x W^T));
    gradients are zeroed, not freed, between steps."""
    with tracking(fake) as tracker:
        weight = torch.nn.Parameter(torch.randn(256, 256))
        x = torch.randn(1024, 256)
        optimizer = torch.optim.AdamW([weight], lr=1e-3)
        tracker.tag(weight, "weights_fp32")
        tracker.reset_peaks()

        def step():
            loss = torch.tanh(x @ weight.T).sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

        with tagging_hooks(tracker, [weight]):
            for _ in range(2):
                tracker.start_step()
                step()
    return tracker


def test_allocator_rounds_up_to_512_byte_blocks():
    assert [allocator_bytes(n) for n in (0, 1, 512, 513, 4 * MB)] == [0, 512, 512, 1024, 4 * MB]


def test_toy_peak_equals_the_hand_count():
    tracker = train_toy(fake=True)
    param = 256 * 256 * 4  # W; its gradient, Adam's exp_avg and exp_avg_sq have its size
    step_count = 512  # Adam's step counter: a 0-dim tensor, one block
    x = 1024 * 256 * 4  # the input (created before the steps: "other")
    activation = 1024 * 256 * 4  # x W^T, tanh of it, and the gradient flowing back through tanh
    scalar = 512  # the loss, and the ones autograd starts backward from
    # Peak: step 2, inside backward, as tanh's backward writes its output: the parameter, its
    # kept gradient, Adam's two moments and step, the input, tanh's saved output, the gradient
    # it is writing, and the loss and its seed gradient.
    expected = param + param + 2 * param + step_count + x + activation + activation + 2 * scalar
    assert tracker.peaks["backward"].bytes == expected
    # forward's peak: as tanh writes its output, x W^T is still alive and no loss exists yet
    assert tracker.peaks["forward"].bytes == param * 4 + step_count + x + 2 * activation
    peak = max(tracker.peaks.values(), key=lambda p: p.bytes)
    assert peak.bytes == expected
    breakdown = tracker.breakdown(peak)
    assert breakdown["weights_fp32"] == param
    assert breakdown["gradients"] == param
    assert breakdown["optimizer_state"] == 2 * param + step_count
    assert breakdown["activations"] == 2 * activation + 2 * scalar
    assert breakdown["other"] == x
    assert sum(breakdown.values()) == expected


def test_fake_and_real_tensors_agree_exactly_on_the_toy():
    fake, real = train_toy(fake=True), train_toy(fake=False)
    for phase in fake.peaks:
        assert fake.peaks[phase].bytes == real.peaks[phase].bytes
        assert fake.breakdown(fake.peaks[phase]) == real.breakdown(real.peaks[phase])


def test_fake_and_real_tensors_agree_exactly_on_a_tiny_dreambooth(tiny_cfg):
    cfg = tiny_cfg("method=dreambooth")
    fake, real = estimate(cfg, fake=True), estimate(cfg, fake=False)
    assert fake.peak_bytes == real.peak_bytes > 0
    assert fake.breakdown == real.breakdown
    assert fake.phase_peak_bytes == real.phase_peak_bytes
    assert fake.after_setup_bytes == real.after_setup_bytes


def test_ti_prediction_counts_adamw_state_and_the_embedding_gradient(tiny_cfg):
    """TI trains the whole input-embedding matrix with AdamW (as the diffusers example)."""
    est = estimate(tiny_cfg("method=ti"))
    rows, dim = 49409, 32  # the CLIP vocabulary plus the new token; the tiny text encoder's width
    table = allocator_bytes(rows * dim * 4)
    assert est.breakdown["optimizer_state"] == 2 * table + 512  # exp_avg, exp_avg_sq, step
    assert est.breakdown["gradients"] == table  # the peak is in the optimizer step
    assert est.phase_peak_bytes["optimizer"] == est.peak_bytes
    assert est.data_dependent_shapes == 2  # the frozen-row mask, counted at its upper bound


def test_zoodip_prediction_has_no_backward_and_no_gradients(tiny_cfg):
    est = estimate(tiny_cfg("method=zoodip"))
    assert est.phase_peak_bytes["backward"] is None
    assert est.breakdown["gradients"] == 0
    assert est.breakdown["weights_int8"] > 0  # the quantized model
    assert 0 < est.breakdown["optimizer_state"] <= 2 * 512  # ZO-Adam's two moments of one token


def test_gfti_peak_does_not_depend_on_the_candidates_traced(tiny_cfg):
    """The predictor traces 2 CMA-ES candidates a generation instead of popsize: the peak
    differs only by the candidate matrix (popsize x subspace dim, float64: 40 KB at SD1.5's
    20 x 256), as long as a candidate's scoring leaves nothing but a scalar behind (one U-Net
    pass of activations per candidate kept would add MBs here)."""
    cfg = tiny_cfg("method=gfti", "method.popsize=4", "method.repeats=1")
    every = estimate(cfg, num_images=1, candidates=None)
    two = estimate(cfg, num_images=1)
    candidate_matrix = allocator_bytes(4 * 32 * 8)  # tiny: subspace dim = min(256, 32)
    assert 0 <= every.peak_bytes - two.peak_bytes <= 2 * candidate_matrix
    # the compute is scaled up to every candidate: what 2 traced ones cost, x popsize / 2
    assert two.predicted_step_flops == pytest.approx(every.predicted_step_flops, rel=1e-3)


def test_zoodip_step_flops_grow_by_one_pass_per_direction_and_the_run_is_steps_times_a_step(tiny_cfg):
    """RGE with n directions makes n + 1 passes a step (text encoder + U-Net); the rest of a
    step (the VAE encode) is the same. Replayed passes count as traced ones."""
    flops = {
        n: estimate(tiny_cfg("method=zoodip", f"method.n={n}", "method.steps=300"), num_images=1)
        for n in (1, 2, 4)
    }
    one_pass = flops[2].predicted_step_flops - flops[1].predicted_step_flops
    assert one_pass > 0
    assert flops[4].predicted_step_flops - flops[2].predicted_step_flops == pytest.approx(
        2 * one_pass, rel=1e-6
    )
    assert flops[1].predicted_step_flops > 2 * one_pass  # two passes and the encode
    assert flops[2].predicted_train_flops == 300 * flops[2].predicted_step_flops


def test_zoodip_memory_options_free_the_vae_and_the_unused_vocabulary(tiny_cfg):
    from benchmark import data, models
    from methods.zoodip import ZOODiP

    def weight_bytes(module, dtype):
        tensors = [*module.parameters(), *module.buffers()]
        return sum(allocator_bytes(t.untyped_storage().nbytes()) for t in tensors if t.dtype == dtype)

    cfg = tiny_cfg("method=zoodip")
    components = models.load_components(cfg.model, dtype=torch.float16)
    method = ZOODiP(ZOODiP.Config(**{**dict(cfg.method), "compact_vocabulary": False}))
    method.setup(components, data.get_subject("dog6"))
    vae_int8, vae_fp16 = weight_bytes(components.vae, torch.int8), weight_bytes(components.vae, torch.float16)
    vocabulary = components.text_encoder.get_input_embeddings().weight
    full_vocabulary = allocator_bytes(vocabulary.numel() * 2)
    lean = estimate(cfg)
    full = estimate(
        tiny_cfg("method=zoodip", "method.cache_latents=false", "method.compact_vocabulary=false")
    )
    assert full.breakdown["weights_int8"] - lean.breakdown["weights_int8"] == vae_int8
    freed_fp16 = full.breakdown["weights_fp16"] - lean.breakdown["weights_fp16"]
    compact = full_vocabulary + vae_fp16 - freed_fp16  # what the compact vocabulary keeps
    assert 0 < compact < allocator_bytes(100 * vocabulary.shape[1] * 2)  # about 60 of 49,409 rows
    batched = estimate(tiny_cfg("method=zoodip", "method.batched_passes=true"))
    # n + 1 = 3 rows of activations at once (the dequantized weight temporaries are shared)
    assert batched.breakdown["activations"] > lean.breakdown["activations"]
    assert batched.peak_bytes > lean.peak_bytes


def real_4bit_weight_bytes(unet) -> int:
    """Allocator bytes of what bitsandbytes stores for a U-Net's 4-bit layers: each packed
    weight and its QuantState (absmax, code table, and with double quantization the offset and
    the nested state's absmax and code table), one block-rounded allocation per storage."""
    from bitsandbytes.nn import Linear4bit

    storages = {}
    for module in unet.modules():
        if not isinstance(module, Linear4bit):
            continue
        state = module.weight.quant_state
        tensors = [module.weight, state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        for t in tensors:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert storages
    return sum(allocator_bytes(n) for n in storages.values())


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_prediction_counts_the_4bit_weights_bitsandbytes_stores(tiny_cfg, double_quant):
    """The prediction runs bitsandbytes' quantization on fake tensors: its 4-bit weights must
    cost what a real (CPU) quantization of the same U-Net stores."""
    import bitsandbytes.functional as bnb_functional
    from torch._subclasses.fake_tensor import FakeTensor

    from benchmark import data, models
    from benchmark.config import method_config, training_dtype
    from methods.qlora import QLoRA

    cfg = tiny_cfg("method=qlora", f"method.double_quant={double_quant}")
    est = estimate(cfg)
    method = QLoRA(method_config(cfg))
    components = models.load_components(cfg.model, "cpu", training_dtype(method.cfg))
    method.setup(components, data.get_subject(cfg.subject))
    assert est.breakdown["weights_4bit"] == real_4bit_weight_bytes(components.unet)
    # the code table bitsandbytes caches during the prediction was fake: it is not left behind
    assert not any(isinstance(v, FakeTensor) for v in bnb_functional.name2qmap.values())
    assert est.phase_breakdown["forward"]["weights_4bit"] == est.breakdown["weights_4bit"]


@pytest.mark.parametrize("bits, symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_fast_fake_quantizers_make_the_real_quantizers_tensors(bits, symmetric):
    """Under fake tensors our quantizers skip their arithmetic: what they return must have
    the shapes, dtypes and strides of what the real quantizers return, for every scheme."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmark.memory.tracker import _fake_quantizers
    from methods.common.quant import quantize_per_channel
    from methods.common.quant_groupwise import quantize_affine_groups

    weight = torch.randn(6, 4, 3, 3)
    real = [*quantize_per_channel(weight, bits, symmetric), *quantize_affine_groups(weight, bits, 12)]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, _fake_quantizers():
        from methods.common import quant, quant_groupwise  # the patched module attributes

        fake_weight = mode.from_tensor(weight)
        fast = [
            *quant.quantize_per_channel(fake_weight, bits, symmetric),
            *quant_groupwise.quantize_affine_groups(fake_weight, bits, 12),
        ]
    described = [None if t is None else (t.shape, t.dtype, t.stride()) for t in real]
    assert [None if t is None else (t.shape, t.dtype, t.stride()) for t in fast] == described
    assert quant.quantize_per_channel is quantize_per_channel  # put back


@pytest.mark.parametrize(
    "method, options",
    [
        ("peqa", ()),  # int8, asymmetric per channel, scales trained (the other schemes' tensors: above)
    ],
)
def test_fast_fake_quantizers_predict_the_same_bytes(tiny_cfg, method, options):
    """Quantizing happens in setup: one step shows what the quantized weights cost."""
    cfg = tiny_cfg(f"method={method}", *options)
    fast = estimate(cfg, steps=1, num_images=1)
    computed = estimate(cfg, steps=1, num_images=1, fast_quantizers=False)
    assert fast.peak_bytes == computed.peak_bytes > 0
    assert fast.breakdown == computed.breakdown
    assert fast.phase_peak_bytes == computed.phase_peak_bytes
    assert fast.phase_breakdown == computed.phase_breakdown
    assert fast.after_setup_bytes == computed.after_setup_bytes


@pytest.mark.parametrize("method", method_names())
def test_every_registered_method_runs_under_fake_tensors(tiny_cfg, method):
    est = estimate(tiny_cfg(f"method={method}"))
    assert est.peak_bytes >= est.after_setup_bytes > 0
    assert sum(est.breakdown.values()) == est.peak_bytes
    assert est.method == method and est.resolution == 64 and est.fake


def test_hub_models_are_refused_with_the_arch_alternative(tiny_cfg):
    from methods.common.base import ConfigError

    with pytest.raises(ConfigError, match="sd15_arch"):
        estimate(tiny_cfg("model=sd15"))


def test_cli_prints_one_json_object_per_configuration(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from benchmark.memory.cli import paper_memory_gb, report

    csv = tmp_path / "predicted.csv"
    overrides = ["method=ti", "model=tiny", "format=json", f"csv={csv}", "measure=true", "device=cpu"]
    with initialize_config_dir(config_dir=str(Path(__file__).parents[2] / "conf"), version_base="1.3"):
        cfg = compose(config_name="memory", overrides=overrides)
    assert report(cfg)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert {"method", "model", "resolution", "batch_size", "peak_bytes", "breakdown"} <= set(row)
    assert (row["method"], row["model"], row["resolution"], row["batch_size"]) == ("ti", "tiny", 64, 1)
    assert sum(row["breakdown"].values()) == row["peak_bytes"]
    # measured on the CPU: the train loop ran, the CUDA figures are None, never 0
    assert row["measured"]["it_per_s"] > 0 and row["measured"]["peak_allocated_bytes"] is None
    table = pd.read_csv(csv)
    assert table.loc[0, "predicted_peak_bytes"] == row["peak_bytes"]
    # the paper's figure (results/paper/table1.csv, row TI) is for SD1.5 only, not the tiny model
    assert pd.isna(table.loc[0, "paper_memory_gb"])
    assert (
        paper_memory_gb("ti", model="sd15_arch") == 6.75 and paper_memory_gb("ti", model="sdxl_arch") is None
    )


def test_a_measure_only_run_meets_the_earlier_prediction_in_the_csv(tmp_path):
    """nox -s memory writes predictions; nox -s memory_gpu (predict=false) later adds the
    measured peaks to the same rows, and the error column compares the two."""
    from benchmark.memory.cli import csv_row, upsert_csv

    csv = tmp_path / "sd15.csv"
    keys = {"method": "zoodip", "variant": "", "model": "sd15_arch", "resolution": 512, "batch_size": 1}
    other = {**keys, "method": "ti"}
    upsert_csv(csv, {**keys, "predicted_peak_bytes": 1_500_000_000, "error": None})
    upsert_csv(csv, {**other, "predicted_peak_bytes": 6_000_000_000, "error": None})
    measured = dict.fromkeys(("peak_reserved_bytes", "nvml_device_peak_bytes", "cuda_context_bytes"))
    measured.update(peak_allocated_bytes=1_200_000_000, nvml_process_peak_bytes=2_000_000_000, it_per_s=3.0)
    table = upsert_csv(csv, {**csv_row(keys, None, measured), "error": None})
    assert len(table) == 2
    row = pd.read_csv(csv).set_index("method").loc["zoodip"]
    assert row["predicted_peak_bytes"] == 1_500_000_000  # kept from the prediction
    assert row["measured_peak_allocated_gb"] == 1.2 and row["measured_nvml_peak_gb"] == 2.0
    assert row["predicted_error_percent"] == 25.0  # (1.5 - 1.2) / 1.2
    assert pd.isna(pd.read_csv(csv).set_index("method").loc["ti", "predicted_error_percent"])


def _prediction(est) -> dict:
    """An estimate without its timing and bookkeeping: what a prediction says."""
    return {k: v for k, v in est.as_dict().items() if k not in ("seconds", "cpu_seconds", "replayed_calls")}


class _Cached(torch.nn.Module):
    """Keeps a tensor of each call alive until the next (as a cache would)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 64)
        self.cache = None

    def forward(self, x):
        self.cache = torch.relu(self.linear(x))
        return self.cache.sum(dim=0)


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))


def toy_replay_peaks(make_module, replay: bool):
    """Peaks (bytes and breakdown per phase) of 5 no-grad calls of a module on (256, 64)
    inputs, each call's output kept (the later calls see more live bytes), and how many calls
    were replayed."""
    from benchmark.memory.pass_replay import PassReplay

    with tracking(fake=True) as tracker:
        module = make_module()
        tracker.reset_peaks()
        replayer, kept = PassReplay(tracker), []
        with torch.no_grad(), replayer.wrapping([module] if replay else []):
            for _ in range(5):
                kept.append(module(torch.ones(256, 64)) * 2)
        peaks = {p: (peak.bytes, tracker.breakdown(peak)) for p, peak in tracker.peaks.items()}
    return peaks, replayer.replayed


@pytest.mark.parametrize("make_module", [_mlp, _Cached])
def test_replayed_calls_give_the_peaks_of_a_full_trace_on_a_toy(make_module):
    """Calls 3-5 of the same signature are replayed; a call that leaves a tensor alive besides
    its output (a cache) never is. Either way the peaks and breakdowns are those of a full trace."""
    replayed, calls = toy_replay_peaks(make_module, replay=True)
    traced, _ = toy_replay_peaks(make_module, replay=False)
    assert replayed == traced
    assert calls == (3 if make_module is _mlp else 0)


@pytest.mark.parametrize(
    "model, method, options",
    [
        ("tiny_sdxl", "gfti", ("method.popsize=4", "method.repeats=1")),  # two text encoders
        ("tiny", "zoodip", ()),
    ],
)
def test_replayed_calls_predict_what_a_full_trace_predicts(tiny_cfg, model, method, options):
    """GF-TI's candidates and ZOODiP's passes call the text encoders and the U-Net with the
    same layouts under no_grad: the repeats are replayed, the prediction is unchanged."""
    cfg = tiny_cfg(f"model={model}", f"method={method}", *options)
    replayed = estimate(cfg, num_images=1)
    traced = estimate(cfg, num_images=1, replay_calls=False)
    assert replayed.replayed_calls > 0 and traced.replayed_calls == 0
    assert _prediction(replayed) == _prediction(traced)


def storage_replaced_peak(watch_deaths: bool) -> int:
    """A tensor whose storage is replaced (``.data =``) lives on while its old storage dies."""
    with tracking(fake=True, watch_deaths=watch_deaths) as tracker:
        tracker.reset_peaks()
        kept = torch.ones(1024, 256)
        kept.data = torch.ones(1)  # its 1 MB storage dies, no tensor object with it
        torch.ones(1024, 256)  # the peak: 1 MB and the small ones, unless the old 1 MB counts
        return tracker.peaks["forward"].bytes


def test_a_replaced_storage_is_seen_dead_when_deaths_are_watched():
    assert storage_replaced_peak(True) == storage_replaced_peak(False) < 2 * MB


def test_watched_deaths_predict_what_reading_every_use_count_predicts(tiny_cfg):
    """Sweeps read the use counts of storages no tensor object holds any more (suspects) only:
    QLoRA has a forward, a backward through bitsandbytes and an AdamW step."""
    cfg = tiny_cfg("method=qlora")
    watched, every = estimate(cfg, num_images=1), estimate(cfg, num_images=1, watch_deaths=False)
    # reading every use count at each allocation, to order the frees, would take minutes: no
    # device-level figure there
    assert every.predicted_device_bytes is None and watched.predicted_device_bytes is not None
    device = ("predicted_device_bytes", "predicted_reserved_bytes")
    assert {k: v for k, v in _prediction(watched).items() if k not in device} == {
        k: v for k, v in _prediction(every).items() if k not in device
    }

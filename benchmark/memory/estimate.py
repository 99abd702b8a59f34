"""Predict a method's peak training memory on the CUDA allocator, without a GPU or weights.

How: the model is built under ``FakeTensorMode`` (fake CPU tensors carry shapes, dtypes and
strides but no data; a fake "cuda" device does not work without a GPU, and ``meta`` tensors
pick the math attention path, which over-counts), then the method's own ``setup()``, ``precompute()`` and two
``step()`` calls run (two, so that optimizer state exists). A ``TorchDispatchMode`` sees every
tensor an operator returns; a storage it has not seen is counted at creation, rounded up to the
CUDA caching allocator's 512-byte blocks, and counted as freed once nothing but the tracker
holds it (the tracker keeps each storage and reads its use count: a weakref finalizer on a
storage's Python object is not reliable, the object can die while the storage lives; use counts
are read only for storages no tensor object seen holding them still holds, see ``sweep``).
Repeated no-grad calls of the U-Net and the text encoders with the same input layouts (GF-TI's
candidates, ZOODiP's passes) are traced twice, then replayed (benchmark/memory/pass_replay.py).
Parameters, buffers, gradients and optimizer state are tagged, so the peak is broken down by
category and by phase (forward, backward, optimizer step and what follows it in the step).

What the prediction is not: the CUDA context (a few hundred MB), the caching allocator's
fragmentation and cached-but-free blocks (``reserved - allocated``), cuBLAS/cuDNN workspaces.
It predicts ``torch.cuda.max_memory_allocated`` after setup, not nvidia-smi. Everything is
counted as on the device, also what a method keeps on the host (e.g. Hollowed Net with
``cache=host`` or offloaded encoders): an upper bound there.

As on CUDA, torch optimizers and clip_grad_norm_ take their ``foreach`` kernels (whose
temporaries span all parameters at once). Operators without fake inputs that draw from a
generator or read real tensors run for real, so the step's random numbers (prompt picks,
timesteps, CMA-ES samples) are real. Values read back from fake tensors (``.item()``,
``.tolist()``, ``.numpy()``, e.g. losses handed to CMA-ES) get placeholders (0, 1.0 or True),
counted in ``data_dependent_values``; sizes that depend on data (boolean masks) count at their
upper bound, counted in ``data_dependent_shapes``.

bitsandbytes' 4-bit weights (QLoRA) are predicted with bitsandbytes' own code: its operators
(quantize_4bit, dequantize_4bit, gemm_4bit, ...) have fake kernels that allocate what the CUDA
kernels return, and a ``Params4bit`` of fake data is made a fake tensor (``_bitsandbytes_fake``).
The 4-bit weights count with their quantization state (per-block absmax, with double
quantization its 8-bit codes and their fp32 absmax, the code tables, the offset). Not included:
the dequantized weight gemm_4bit's CUDA kernel may make and free inside one operator (at most
one layer's weight in the compute dtype).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmark.memory.device import CUDA_CONTEXT_BYTES
from benchmark.memory.device import replay as replay_on_device
from benchmark.memory.pass_replay import PassReplay
from benchmark.memory.profiling import model_tensors, weight_category
from benchmark.memory.tracker import (
    NOT_INCLUDED,
    PHASES,
    quant_state_tensors,
    tagging_hooks,
    tracking,
)

log = logging.getLogger(__name__)


class _GlobalOnly:
    """A module tracker that attributes every FLOP to the total only."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class TotalFlopCounter(FlopCounterMode):
    """PyTorch's FLOP counter without its per-module attribution, whose backward hooks keep the
    tensors that gradient checkpointing recomputes alive until the step ends (a peak that is
    not the training's). Only the total is read here."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _GlobalOnly()


@dataclasses.dataclass
class Estimate:
    method: str
    model: str
    resolution: int
    batch_size: int
    dtype: str
    peak_bytes: int
    breakdown: dict[str, int]
    phase_peak_bytes: dict[str, int | None]
    phase_breakdown: dict[str, dict[str, int] | None]
    after_setup_bytes: int
    data_dependent_values: int
    data_dependent_shapes: int
    steps: int
    fake: bool
    seconds: float  # wall time of the prediction
    cpu_seconds: float  # its process CPU time (on a shared machine, closer to an idle one's wall time)
    replayed_calls: int = 0  # module calls replayed, not traced (benchmark/memory/pass_replay.py)
    # nvidia-smi's figure: the caching-allocator model's reserved peak + the context term
    # (benchmark/memory/device.py); None where the trace could not give the allocation order
    predicted_device_bytes: int | None = None
    predicted_reserved_bytes: int | None = None
    cuda_context_bytes: int | None = None
    # compute: FLOPs of one training step (the mean of the traced steps; PyTorch's FLOP counter,
    # matmuls, convolutions and attention), and times the method's configured steps
    predicted_step_flops: int | None = None
    predicted_train_flops: int | None = None
    train_steps: int | None = None
    not_included: str = NOT_INCLUDED

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def estimate(
    cfg,
    steps: int = 2,
    fake: bool = True,
    num_images: int = 5,
    candidates: int | None = 2,
    fast_quantizers: bool = True,
    replay_calls: bool = True,
    watch_deaths: bool = True,
    context_bytes: int = CUDA_CONTEXT_BYTES,
) -> Estimate:
    """Predicted allocator peak of ``steps`` training steps of ``cfg.method`` on ``cfg.model``
    (a ``tiny`` or ``arch`` model: no weights are read). ``num_images``: the subject's training
    images (most DreamBooth subjects have 5); ``fake=False`` runs the same on real CPU tensors.
    ``candidates``: the CMA-ES population traced (GF-TI; None: the config's). Candidates are
    scored one after another and each keeps a scalar loss, so the peak depends on how many
    there are only through the candidate matrix (popsize x subspace dim in float64: 40 KB at
    SD1.5, left out; tests/memory/test_memory_estimate.py checks the bound), while the time does:
    GF-TI's 20 candidates x 5 images x 5 repeats are 500 U-Net samples a step.
    ``fast_quantizers``: see ``tracking``. ``replay_calls``: under fake tensors, repeated no-grad
    calls of the U-Net and text encoders with the same input layouts are traced once and then
    replayed (benchmark/memory/pass_replay.py: the same peaks and breakdowns). ``watch_deaths``: see
    ``LiveStorageTracker.sweep`` (if a storage died unwatched, predicted again without).
    ``context_bytes``: the CUDA context and workspaces, added to the modelled reserved peak for
    ``predicted_device_bytes`` (benchmark/memory/device.py)."""
    from benchmark import data, models
    from benchmark.config import make_method, method_config, training_dtype
    from benchmark.train import step_generator
    from methods.common.base import ConfigError
    from methods.common.sampling import training_batch

    method_cfg = method_config(cfg)
    all_candidates = getattr(method_cfg, "popsize", None)
    if candidates is not None and hasattr(method_cfg, "popsize"):
        method_cfg = dataclasses.replace(method_cfg, popsize=min(candidates, method_cfg.popsize))
    if models._kind(cfg.model) == "hub":
        raise ConfigError(
            f"model={cfg.model.name} has real weights; predict memory with its architecture alone, "
            "e.g. model=sd15_arch"
        )
    dtype = training_dtype(method_cfg)
    subject = data.get_subject(cfg.subject, cfg.data)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with tracking(fake, fast_quantizers, watch_deaths) as tracker:
        tracker.checking_peaks = False  # loading: only what is live after it counts (reset_peaks)
        components = models.load_components(cfg.model, "cpu", dtype)
        method = make_method(cfg, method_cfg)
        method.setup(components, subject)
        size, bsz = method_cfg.resolution, method_cfg.batch_size
        images = torch.zeros(num_images, 3, size, size)  # the subject's images, on the device as in train()
        method.precompute(images, int(cfg.seed), steps)  # e.g. Hollowed Net's stage 1: part of the load
        weights, params = model_tensors(components, method)
        for tensor in weights:
            tracker.tag(tensor, weight_category(tensor.dtype), overwrite=False)
        for tensor in quant_state_tensors(weights):
            tracker.tag(tensor, "weights_4bit", overwrite=False)
        after_setup = tracker.reset_peaks()
        live = sorted((e.serial, e.nbytes) for e in (*tracker.storages.values(), *tracker.pinned.values()))
        if watch_deaths:  # the allocation order (every sweep reading all use counts: too slow)
            tracker.events = []
        replay = PassReplay(tracker)
        replayed = [components.unet, *components.text_encoders] if fake and replay_calls else []
        replay.flop_counter = flop_counter = TotalFlopCounter()
        with tagging_hooks(tracker, params, method), replay.wrapping(replayed), flop_counter:
            for step in range(steps):
                tracker.start_step()
                generator = step_generator(int(cfg.seed), step)
                batch = training_batch(images, method_cfg.data, int(cfg.seed), step, bsz, generator)
                method.step(batch, step)
    if tracker.silent_deaths:
        log.warning("%d storages died unwatched: predicted again", tracker.silent_deaths)
        again = estimate(
            cfg, steps, fake, num_images, candidates, fast_quantizers, replay_calls, False, context_bytes
        )
        return dataclasses.replace(  # the time of both predictions
            again, seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - cpu0
        )
    peaks, seen = tracker.peaks, tracker.phases_seen  # a phase the method has not (no backward in ZO): None
    top = max(PHASES, key=lambda p: peaks[p].bytes)
    device = replay_on_device(live, tracker.events, context_bytes) if tracker.events is not None else None
    step_flops = (flop_counter.get_total_flops() + replay.replayed_flops) / steps
    if all_candidates:  # GF-TI: each candidate scored alike; traced with fewer
        step_flops *= all_candidates / method_cfg.popsize
    return Estimate(
        method=method_cfg.name,
        model=str(cfg.model.name),
        resolution=method_cfg.resolution,
        batch_size=method_cfg.batch_size,
        dtype=str(dtype).removeprefix("torch."),
        peak_bytes=peaks[top].bytes,
        breakdown=tracker.breakdown(peaks[top]),
        phase_peak_bytes={p: peaks[p].bytes if p in seen else None for p in PHASES},
        phase_breakdown={p: tracker.breakdown(peaks[p]) if p in seen else None for p in PHASES},
        after_setup_bytes=after_setup,
        data_dependent_values=tracker.data_dependent_values,
        data_dependent_shapes=tracker.data_dependent_shapes,
        steps=steps,
        fake=fake,
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - cpu0,
        replayed_calls=replay.replayed,
        predicted_device_bytes=device and device.device_bytes,
        predicted_reserved_bytes=device and device.reserved_bytes,
        cuda_context_bytes=context_bytes,
        predicted_step_flops=round(step_flops),
        predicted_train_flops=round(step_flops * method_cfg.steps),
        train_steps=method_cfg.steps,
    )

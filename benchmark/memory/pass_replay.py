"""Repeated module calls traced once by the memory predictor (benchmark/memory/estimate.py).

GF-TI scores 2 candidates x 5 batches a generation, each batch a text-encoder and a U-Net call
of the same shapes under no_grad (ZOODiP's n + 1 passes and selective's ZO steps likewise).
Under fake tensors a call costs seconds on SDXL, and it allocates the same storages in the same
order every time: what a call allocates follows from its inputs' shapes, dtypes and strides and
from the module's own tensors, not from values. So a call is traced, and what it did to the
allocator is kept (``PassRecord``): the bytes of the storages it made that were live at its own
peak, and the layout of its outputs. A later call with the same signature (module state, grad
mode, inputs' layouts) is replayed: those storages are born and die at once, with a peak check
in between, and outputs of the recorded layout are made. The peaks and their breakdowns come
out as a full trace gives them (tests/memory/test_memory_estimate.py), because a replayed call is only
one whose record is proven repeatable:

- grad is off (no autograd graph keeps a call's tensors alive after it);
- the call leaves nothing alive but its outputs and frees nothing that lived before it (a
  module that keeps a cache or state tensor is traced every time); nothing made in it is
  tagged as a weight, gradient or optimizer state; nothing grows in place;
- the first two calls of a signature are both traced and must give the same record (values do
  not change what is allocated); only the third and later calls are replayed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from benchmark.memory.tracker import Peak

TRACES_BEFORE_REPLAY = 2  # calls of a signature traced (and compared) before the next are replayed


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one traced call did to the allocator."""

    peak_storage_bytes: tuple[int, ...]  # storages made by the call, live at its peak (birth order)
    output_storages: tuple[tuple[int, torch.dtype, torch.device], ...]  # (nbytes, dtype, device) each
    output_leaves: tuple[tuple[str, Any], ...]  # see _OutputLayout
    output_spec: Any
    data_dependent_values: int
    data_dependent_shapes: int
    flops: int = 0  # counted by the FLOP counter while traced; added again when replayed


@dataclasses.dataclass
class _Signature:
    records: list[PassRecord]
    replayable: bool = True


class PassReplay:
    """Traces or replays the calls of ``modules``' ``forward`` (see the module docstring)."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self.signatures: dict[Any, _Signature] = {}
        self.depth = 0  # only the outermost call of a wrapped module is traced or replayed
        self.traced = self.replayed = 0
        self.flop_counter = None  # a torch.utils.flop_counter.FlopCounterMode, if FLOPs are counted
        self.replayed_flops = 0  # the FLOPs of replayed calls (their kernels never ran)

    @contextlib.contextmanager
    def wrapping(self, modules: list[torch.nn.Module]) -> Iterator[None]:
        wrapped = []
        for module in dict.fromkeys(modules):  # each once
            if "forward" in vars(module):
                continue  # already an instance attribute: leave it alone
            module.forward = self._wrapper(module, module.forward)
            wrapped.append(module)
        try:
            yield
        finally:
            for module in wrapped:
                del module.forward

    def _wrapper(self, module, forward):
        def forward_traced_once(*args, **kwargs):
            key = None if self.depth or torch.is_grad_enabled() else self._signature(module, args, kwargs)
            entry = None if key is None else self.signatures.setdefault(key, _Signature([]))
            if entry is None or not entry.replayable:
                return forward(*args, **kwargs)
            if len(entry.records) >= TRACES_BEFORE_REPLAY:
                self.replayed += 1
                return self._replay(entry.records[-1])
            self.depth += 1
            try:
                out, record = self._trace(forward, args, kwargs)
            finally:
                self.depth -= 1
            self.traced += 1
            if record is None or (entry.records and record != entry.records[0]):
                entry.replayable = False
            else:
                entry.records.append(record)
            return out

        return forward_traced_once

    def _trace(self, forward, args, kwargs) -> tuple[Any, PassRecord | None]:
        """Run the call with the phase's peak lowered to the bytes live now, so that the call's
        own peak is recorded (the first time it is reached, as a full trace records it). Not
        when more is live now than the phase's peak (the phase has just begun): a plain call."""
        tracker = self.tracker
        live = tracker.sweep()
        phase, first_serial, first_sweep = tracker.phase, tracker.serial + 1, tracker.sweeps
        saved = tracker.peaks[phase]
        if live > saved.bytes:
            return forward(*args, **kwargs), None
        entry_peak = Peak(live, tracker.serial, tracker.sweeps, tracker.step_start_serial)
        tracker.peaks[phase] = entry_peak
        values, shapes = tracker.data_dependent_values, tracker.data_dependent_shapes
        flops = self._counted_flops()
        try:
            out = forward(*args, **kwargs)
        finally:
            reached = tracker.peaks[phase]
            tracker.peaks[phase] = reached if reached.bytes > saved.bytes else saved
        if reached is entry_peak or tracker.phase != phase:  # it never exceeded what was live before
            return out, None
        tracker.sweep()
        born = range(first_serial, tracker.serial + 1)
        alive = [s for s in born if s not in tracker.died_at_sweep]
        freed_older = any(
            sweep > first_sweep and serial < first_serial for serial, sweep in tracker.died_at_sweep.items()
        )
        layout = _output_layout(out, tracker)
        if freed_older or layout is None or alive != layout.serials or any(s in tracker.tags for s in born):
            return out, None
        at_peak = [
            s
            for s in born
            if s <= reached.serial and tracker.died_at_sweep.get(s, reached.sweep + 1) > reached.sweep
        ]
        record = PassRecord(
            peak_storage_bytes=tuple(tracker.bytes_of[s] for s in at_peak),
            output_storages=layout.storages,
            output_leaves=layout.leaves,
            output_spec=layout.spec,
            data_dependent_values=tracker.data_dependent_values - values,
            data_dependent_shapes=tracker.data_dependent_shapes - shapes,
            flops=self._counted_flops() - flops,
        )
        return out, record

    def _counted_flops(self) -> int:
        return 0 if self.flop_counter is None else int(self.flop_counter.get_total_flops())

    def _replay(self, record: PassRecord) -> Any:
        """The traced call's storages born and dead at once (a peak check between), then its outputs."""
        tracker = self.tracker
        tracker.sweep()  # upper_bytes: the bytes live now, exactly
        phase = tracker.phase
        tracker.phases_seen.add(phase)
        first_serial = tracker.serial + 1
        for nbytes in record.peak_storage_bytes:
            tracker.serial += 1
            tracker.bytes_of[tracker.serial] = nbytes
            tracker.upper_bytes += nbytes
        if tracker.upper_bytes > tracker.peaks[phase].bytes:
            tracker.peaks[phase] = Peak(
                tracker.upper_bytes, tracker.serial, tracker.sweeps, tracker.step_start_serial
            )
        tracker.sweeps += 1
        for serial in range(first_serial, tracker.serial + 1):
            tracker.died_at_sweep[serial] = tracker.sweeps
        if tracker.events is not None:  # the call's storages at its peak, made then freed
            born = range(first_serial, tracker.serial + 1)
            tracker.events += [("alloc", s, tracker.bytes_of[s]) for s in born]
            tracker.events += [("free", s, 0) for s in born]
        tracker.upper_bytes -= sum(record.peak_storage_bytes)
        self.replayed_flops += record.flops
        tracker.data_dependent_values += record.data_dependent_values
        tracker.data_dependent_shapes += record.data_dependent_shapes
        bases = [torch.empty(n // d.itemsize, dtype=d, device=dev) for n, d, dev in record.output_storages]
        leaves = [
            leaf if kind == "value" else bases[leaf[0]].as_strided(*leaf[1:])
            for kind, leaf in record.output_leaves
        ]
        return tree_unflatten(leaves, record.output_spec)

    def _signature(self, module: torch.nn.Module, args, kwargs) -> Any:
        """What a call's allocations can depend on, or None (then the call is not traced once)."""
        leaves, spec = tree_flatten((args, kwargs))
        described = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                key = leaf.untyped_storage()._cdata
                tracked = key in self.tracker.storages or key in self.tracker.pinned
                leaf = (type(leaf), tuple(leaf.shape), leaf.stride(), leaf.storage_offset(), leaf.dtype,
                        leaf.device, leaf.requires_grad, tracked)  # fmt: skip
            described.append(leaf)
        modules = tuple(
            (id(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks)) for m in module.modules()
        )
        tensors = tuple((id(t), t.requires_grad) for t in (*module.parameters(), *module.buffers()))
        key = (id(module), spec, tuple(described), modules, tensors, torch.is_autocast_enabled())
        try:
            hash(key)
        except TypeError:
            return None
        return key


@dataclasses.dataclass
class _OutputLayout:
    storages: tuple[tuple[int, torch.dtype, torch.device], ...]  # (nbytes, dtype, device) each
    leaves: tuple[tuple[str, Any], ...]  # ("view", (storage index, shape, stride, offset)) or ("value", v)
    spec: Any
    serials: list[int]  # the tracker's serials of the storages


def _output_layout(out, tracker) -> _OutputLayout | None:
    """How to make ``out`` again: new storages, and views into them; None when an output is
    not a plain fake tensor of a storage the call made."""
    leaves, spec = tree_flatten(out)
    index_of: dict[int, int] = {}
    storages, described, serials = [], [], []
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            described.append(("value", leaf))
            continue
        if type(leaf) is not FakeTensor or leaf.requires_grad:
            return None
        storage = leaf.untyped_storage()
        entry = tracker.storages.get(storage._cdata)
        if entry is None or storage.nbytes() % leaf.dtype.itemsize:
            return None
        if storage._cdata not in index_of:
            index_of[storage._cdata] = len(storages)
            storages.append((storage.nbytes(), leaf.dtype, leaf.device))
            serials.append(entry.serial)
        elif storages[index_of[storage._cdata]][1] != leaf.dtype:
            return None
        view = (index_of[storage._cdata], tuple(leaf.shape), leaf.stride(), leaf.storage_offset())
        described.append(("view", view))
    return _OutputLayout(tuple(storages), tuple(described), spec, sorted(serials))

"""The live-storage tracker behind the memory prediction (benchmark.memory.estimate).

A ``TorchDispatchMode`` that counts every storage an operator returns as the CUDA caching
allocator would (512-byte blocks) and frees it once nothing but the tracker holds it; it tags
parameters, buffers, gradients and optimizer state and keeps each phase's peak. ``tracking``
makes one active, under fake tensors with the patches a model and its optimizers need there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import logging
import pkgutil
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves, tree_map

from benchmark.memory.profiling import (
    CATEGORIES,
    optimizer_state_tensors,
    update_rules,
)

log = logging.getLogger(__name__)
ALLOCATOR_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every block up to 512 bytes
PHASES = ("forward", "backward", "optimizer")
# torch.tensor(python data) ends in lift_fresh: fake mode makes a new (fake) tensor, real mode
# returns its input; on a GPU the constant is copied to the device. Counted in both modes.
LIFTS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
NOT_INCLUDED = (
    "the peak predicts torch.cuda.max_memory_allocated after setup; it leaves out the CUDA context, "
    "cached free blocks and fragmentation, cuBLAS/cuDNN workspaces (the device-level figure adds them)"
)


def allocator_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of ``nbytes``."""
    return -(-nbytes // ALLOCATOR_BLOCK_BYTES) * ALLOCATOR_BLOCK_BYTES


def _has_storage(tensor: torch.Tensor) -> bool:
    """Plain (and fake) tensors own a storage; sparse tensors and wrapper subclasses do not."""
    return not (tensor.is_sparse or tensor.is_nested or is_traceable_wrapper_subclass(tensor))


def _stays_real(args, kwargs) -> bool:
    """Under fake tensors, an operator runs on real tensors when it has no fake input and either
    real tensor inputs or a generator: numbers drawn from the step's CPU generator stay real
    (prompt picks, timesteps, CMA-ES samples handed to numpy). An operator that makes a tensor
    on another device (a fake GPU) goes fake, checking its generator's device as CUDA would."""
    if any(isinstance(a, FakeTensor) for a in args):
        return False
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type != torch.device(device).type:
            raise RuntimeError(
                f"Expected a '{torch.device(device).type}' device type for generator but found "
                f"'{generator.device.type}'"
            )
        return False
    leaves = [a for a in tree_leaves((args, kwargs)) if isinstance(a, (torch.Tensor, torch.Generator))]
    return bool(leaves) and not any(isinstance(a, FakeTensor) for a in leaves)


def _kernel_storage_bytes(func, args, out: torch.Tensor) -> int | None:
    """Where a real kernel's output storage is larger than its meta kernel says. mse_loss with a
    reduction computes the elementwise loss and reduces it into the same buffer, so the 0-dim
    loss keeps the whole buffer alive (measured on CPU)."""
    if (
        func is torch.ops.aten.mse_loss.default
        and isinstance(out, FakeTensor)
        and (len(args) < 3 or args[2] != 0)
    ):
        return torch.broadcast_shapes(args[0].shape, args[1].shape).numel() * out.element_size()
    return None


def _placeholder(tensor: torch.Tensor) -> bool | int | float:
    if tensor.dtype == torch.bool:
        return True
    return 1.0 if tensor.is_floating_point() or tensor.is_complex() else 0


@dataclasses.dataclass
class _Storage:
    storage: torch.UntypedStorage  # held by the tracker: use count 1 means nobody else holds it
    nbytes: int
    serial: int


@dataclasses.dataclass
class Peak:
    """The live storages at a peak, as (serial counter, sweep counter) at that moment."""

    bytes: int = 0
    serial: int = 0
    sweep: int = 0
    step_start_serial: int = 0


class LiveStorageTracker(TorchDispatchMode):
    """Live storage bytes of every tensor created while it is active, with peaks per phase.

    Frees are found by sweeping: a storage whose only owner is the tracker is dead. A sweep
    runs whenever the bytes of possibly-live storages exceed a peak, so every peak is exact.
    Which storages were live at a peak is rebuilt afterwards from serial numbers (birth order)
    and the sweep that found each death.
    """

    def __init__(self, fake: bool = False) -> None:
        super().__init__()
        self.fake = fake  # under FakeTensorMode: some operators run on real tensors (_stays_real)
        self.storages: dict[int, _Storage] = {}  # by StorageImpl address, while alive
        self.pinned: dict[int, _Storage] = {}  # the same for weights and optimizer state
        self.bytes_of: dict[int, int] = {}  # serial -> allocator bytes (forever)
        self.died_at_sweep: dict[int, int] = {}  # serial -> sweep that found it dead
        self.tags: dict[int, str] = {}  # serial -> category
        self.upper_bytes = 0  # bytes of tracked storages, some possibly dead
        self.serial = self.sweeps = 0
        self.step_start_serial = 0
        self.peaks = {phase: Peak() for phase in PHASES}
        self.in_optimizer = 0
        self.after_optimizer = False
        self.data_dependent_values = 0
        self.data_dependent_shapes = 0
        self.phases_seen: set[str] = set()  # phases in which a storage was created
        self.checking_peaks = True  # False while loading: reset_peaks() starts the peaks afresh
        self.fake_mode: FakeTensorMode | None = None  # set by tracking(fake=True)
        self._functional: dict[Any, bool] = {}  # operator -> returns new tensors, mutates nothing
        # Deaths, watched (see sweep): a tensor object we saw holds its storage alive, so only
        # storages none of them holds any more ("suspects") can be dead.
        self.watch_deaths = True
        self.holders: dict[int, int] = {}  # storage key -> live tensor objects seen holding it
        self.suspects: set[int] = set()  # tracked storages no such object holds: maybe dead
        self._watched: dict[int, tuple[weakref.ref, int]] = {}  # id(weakref) -> (it, storage key)
        self.sweep_all_next = False  # a tensor's storage was replaced (.data =, set_, swap_tensors)
        self.silent_deaths = 0  # storages found dead while a tensor object seen holding them lived
        # The allocation sequence for the caching-allocator model (benchmark/memory/device.py):
        # ("alloc", serial, bytes) and ("free", serial, 0), recorded once ``events`` is a list.
        self.events: list[tuple[str, int, int]] | None = None

    # -- bookkeeping ---------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """backward inside autograd; optimizer inside an optimizer step and after it, until the
        next backward or step (the update's tail, e.g. TI restoring the frozen rows); else forward."""
        if torch._C._current_graph_task_id() != -1:
            self.after_optimizer = False
            return "backward"
        return "optimizer" if self.in_optimizer or self.after_optimizer else "forward"

    def sweep(self, everything: bool = False) -> int:
        """Drop dead storages; returns the bytes now live. Weights and optimizer state
        (pinned) are checked only when ``everything``: at step starts and at the end.

        With ``watch_deaths``, a sweep between those reads the use counts of the suspects only:
        every tensor object an operator returned is watched (a weak reference), and a storage
        one of them still holds cannot be dead, since a tensor object holds its storage (a
        tensor autograd keeps is kept with its object: PyObject preservation). A storage
        loses its holders only with them, or when a tensor's storage is replaced (``.data =``,
        ``set_``, ``swap_tensors``: then the next sweep reads them all). A full sweep that
        finds a storage dead which a watched object still held counts a silent death: then
        ``estimate`` predicts again reading every use count at every sweep."""
        self.sweeps += 1
        if everything or self.sweep_all_next or not self.watch_deaths:
            expected = self.sweep_all_next or not self.watch_deaths
            self.sweep_all_next = False
            for pool in (self.storages, self.pinned) if everything else (self.storages,):
                keys = list(pool)  # the StorageImpl addresses, valid while the tracker holds them
                use_counts = map(torch._C._storage_Use_Count, keys)  # one C loop: the hot spot
                for key in [k for k, count in zip(keys, use_counts) if count <= 1]:
                    if not expected and self.holders.get(key, 0) > 0:
                        self.silent_deaths += 1
                    self._bury(pool, key)
            return self.upper_bytes
        keys = [k for k in list(self.suspects) if k in self.storages]
        for key in [k for k, count in zip(keys, map(torch._C._storage_Use_Count, keys)) if count <= 1]:
            self._bury(self.storages, key)
        return self.upper_bytes

    def _bury(self, pool: dict[int, _Storage], key: int) -> None:
        dead = pool.pop(key)
        if self.events is not None:
            self.events.append(("free", dead.serial, 0))
        self.upper_bytes -= dead.nbytes
        self.died_at_sweep[dead.serial] = self.sweeps
        self.suspects.discard(key)
        self.holders.pop(key, None)

    def _watch(self, tensor: torch.Tensor, key: int) -> None:
        ref = weakref.ref(tensor, self._tensor_died)
        self._watched[id(ref)] = (ref, key)
        self.holders[key] = self.holders.get(key, 0) + 1
        self.suspects.discard(key)

    def unwatch(self, *tensors: torch.Tensor) -> None:
        """Drop the watches of ``tensors`` (their storages become suspects)."""
        for ref, _ in list(self._watched.values()):
            if any(ref() is t for t in tensors):
                self._tensor_died(ref)

    def _tensor_died(self, ref: weakref.ref) -> None:
        _, key = self._watched.pop(id(ref), (None, None))
        if key is None:
            return
        left = self.holders.get(key, 0) - 1
        if left > 0:
            self.holders[key] = left
        else:
            self.holders.pop(key, None)
            self.suspects.add(key)

    def pin(self, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage()._cdata
        if key in self.storages:
            self.pinned[key] = self.storages.pop(key)

    def track(self, tensor: torch.Tensor, nbytes: int | None = None, peak: bool = True) -> int | None:
        """Count ``tensor``'s storage (``nbytes`` if given) if new; returns its serial (None
        for storage-less tensors). ``peak=False``: the caller checks for a peak afterwards."""
        if not _has_storage(tensor):
            return None
        storage = tensor.untyped_storage()
        entry = self.storages.get(storage._cdata) or self.pinned.get(storage._cdata)
        nbytes = allocator_bytes(self._concrete(storage.nbytes() if nbytes is None else nbytes))
        if self.checking_peaks:  # while loading, no sweep needs the watches (see reset_peaks)
            self._watch(tensor, storage._cdata)
        if entry is not None:
            if nbytes > entry.nbytes:  # grown in place (resize_): a new block replaces the old one
                self.sweeps += 1
                self.died_at_sweep[entry.serial] = self.sweeps
                self.serial += 1
                if self.events is not None:
                    self.events += [("alloc", self.serial, nbytes), ("free", entry.serial, 0)]
                if entry.serial in self.tags:
                    self.tags[self.serial] = self.tags[entry.serial]
                self.upper_bytes += nbytes - entry.nbytes
                entry.serial, entry.nbytes, self.bytes_of[self.serial] = self.serial, nbytes, nbytes
                if peak:
                    self._maybe_peak()
            return entry.serial
        if self.events is not None:  # frees in order: what died before this storage was made
            self.sweep()
        self.serial += 1
        if self.events is not None:
            self.events.append(("alloc", self.serial, nbytes))
        self.storages[storage._cdata] = _Storage(storage, nbytes, self.serial)
        self.bytes_of[self.serial] = nbytes
        self.upper_bytes += nbytes
        if peak:
            self._maybe_peak()
        return self.serial

    def _concrete(self, nbytes: int | torch.SymInt) -> int:
        """A data-dependent size (e.g. of a boolean-mask selection) counts at its upper bound."""
        if isinstance(nbytes, int):
            return nbytes
        self.data_dependent_shapes += 1
        upper = nbytes.node.shape_env.bound_sympy(nbytes.node.expr).upper
        if not upper.is_finite:
            raise RuntimeError(f"a tensor's size {nbytes} depends on data and has no upper bound")
        return int(upper)

    def _maybe_peak(self) -> None:
        if not self.checking_peaks:
            return
        self.phases_seen.add(self.phase)
        peak = self.peaks[self.phase]
        if self.upper_bytes > peak.bytes and self.sweep() > peak.bytes:
            self.peaks[self.phase] = Peak(self.upper_bytes, self.serial, self.sweeps, self.step_start_serial)

    def tag(self, tensor: torch.Tensor | None, category: str, overwrite: bool = True) -> None:
        if tensor is None:
            return
        serial = self.track(tensor)
        if serial is not None and (overwrite or serial not in self.tags):
            self.tags[serial] = category
            if category.startswith("weights") or category == "optimizer_state":
                self.pin(tensor)

    def leave_optimizer(self) -> None:
        self.in_optimizer -= 1
        self.after_optimizer = True

    def start_step(self) -> None:
        self.sweep(everything=True)
        self.step_start_serial = self.serial + 1
        self.after_optimizer = False

    def reset_peaks(self) -> int:
        """Peaks start again from the bytes live now (as torch.cuda.reset_peak_memory_stats)."""
        live = self.sweep(everything=True)
        self.step_start_serial = self.serial + 1  # nothing live now belongs to a step
        self.peaks = {p: Peak(live, self.serial, self.sweeps, self.step_start_serial) for p in PHASES}
        self.phases_seen.clear()
        if not self.checking_peaks:  # what loading left unwatched: suspects until watched
            self.suspects.update(k for k in self.storages if k not in self.holders)
        self.checking_peaks = True
        return live

    def _fake_inputs(self, func, args, kwargs):
        """An operator with fake inputs gets its real tensor inputs (e.g. TuneQDM's timestep-set
        index) as the fake mode would make them (its converter, memoized per tensor), so that
        the fake mode's dispatch cache serves it (real inputs bypass the cache). Only for
        functional operators: their outputs are new tensors either way."""
        leaves = tree_leaves((args, kwargs))
        fakes = [isinstance(a, FakeTensor) for a in leaves if isinstance(a, torch.Tensor)]
        if all(fakes) or not any(fakes):
            return args, kwargs
        functional = self._functional.get(func)
        if functional is None:
            schema = func._schema
            functional = not schema.is_mutable and all(r.alias_info is None for r in schema.returns)
            self._functional[func] = functional
        if not functional:
            return args, kwargs
        mode = self.fake_mode

        def fake(a):
            if not isinstance(a, torch.Tensor) or isinstance(a, FakeTensor):
                return a
            return mode.fake_tensor_converter.from_real_tensor(mode, a)

        return tree_map(fake, args), tree_map(fake, kwargs)

    # -- the dispatch hook ---------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default and isinstance(args[0], FakeTensor):
            # the fake mode's own answer, without its dispatch (tens of thousands of calls a step)
            return torch.device("meta") if args[0].fake_mode.in_kernel_invocation else args[0].fake_device
        if func.overloadpacket is torch.ops.aten.set_:
            self.sweep_all_next = True  # a tensor's storage replaced: its old one may die unwatched
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            self.data_dependent_values += 1  # .item() of a fake tensor: no value exists
            return _placeholder(args[0])
        if self.fake and _stays_real(args, kwargs):
            with unset_fake_temporarily():  # random numbers stay real (prompts, CMA-ES samples), and so on
                out = func(*args, **kwargs)
        else:
            if self.fake_mode is not None:
                args, kwargs = self._fake_inputs(func, args, kwargs)
            out = func(*args, **kwargs)
        outputs = (
            [out]
            if isinstance(out, torch.Tensor)
            else [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        )
        if outputs:
            # One peak check after all outputs: nothing can die while ``out`` holds them, so the
            # bytes only grow from one output to the next (one sweep, not one per output of a
            # foreach operator over thousands of parameters).
            inputs, serial_before = None, self.serial
            for tensor in outputs:
                if not _has_storage(tensor):
                    continue
                key = tensor.untyped_storage()._cdata
                if key in self.storages or key in self.pinned or func in LIFTS:
                    self.track(tensor, peak=False)  # maybe resized; a lifted constant is copied to the GPU
                    continue
                if inputs is None:  # a view or in-place result of an untracked input is no allocation
                    inputs = {
                        t.untyped_storage()._cdata
                        for t in tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor) and _has_storage(t)
                    }
                if key not in inputs:
                    self.track(tensor, _kernel_storage_bytes(func, args, tensor), peak=False)
            if self.serial != serial_before:  # something allocated (or grown): as after each alone
                self._maybe_peak()
        return out

    # -- the report ----------------------------------------------------------------------
    def live_at(self, peak: Peak) -> list[int]:
        return [
            s
            for s in self.bytes_of
            if s <= peak.serial and self.died_at_sweep.get(s, peak.sweep + 1) > peak.sweep
        ]

    def breakdown(self, peak: Peak) -> dict[str, int]:
        """Bytes per category at ``peak``: tagged storages by tag; untagged ones created
        during the step of the peak are activations (and temporaries), older ones other."""
        out = dict.fromkeys(CATEGORIES, 0)
        for s in self.live_at(peak):
            category = self.tags.get(s) or ("activations" if s >= peak.step_start_serial else "other")
            out[category] += self.bytes_of[s]
        return out


@contextlib.contextmanager
def tagging_hooks(tracker: LiveStorageTracker, params: list[torch.Tensor], method=None) -> Iterator[None]:
    """Tag gradients as they are accumulated (or before any optimizer step), and optimizer
    state after each optimizer step; mark the optimizer phase, also for a method's
    hand-written optimizers (profiling.update_rules)."""

    def before_step(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                tracker.tag(p.grad, "gradients")
        tracker.in_optimizer += 1

    def after_step(optimizer, args, kwargs):
        tracker.leave_optimizer()
        for state in optimizer.state.values():
            for value in tree_leaves(state):
                if isinstance(value, torch.Tensor):
                    tracker.tag(value, "optimizer_state", overwrite=False)

    def as_optimizer_step(step):
        def wrapped(*args, **kwargs):
            tracker.in_optimizer += 1
            try:
                return step(*args, **kwargs)
            finally:
                tracker.leave_optimizer()
                for tensor in optimizer_state_tensors(method):
                    tracker.tag(tensor, "optimizer_state", overwrite=False)

        return wrapped

    handles = [
        register_optimizer_step_pre_hook(before_step),
        register_optimizer_step_post_hook(after_step),
    ]
    handles += [
        p.register_post_accumulate_grad_hook(lambda p: tracker.tag(p.grad, "gradients"))
        for p in params
        if p.requires_grad and p.is_leaf
    ]
    rules = update_rules(method) if method is not None else []
    for rule in rules:
        rule.step = as_optimizer_step(rule.step)  # an instance attribute, removed below
    for tensor in optimizer_state_tensors(method) if method is not None else []:
        tracker.tag(tensor, "optimizer_state", overwrite=False)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for rule in rules:
            del rule.step


def _optimizer_modules() -> list[Any]:
    import torch.optim

    names = [f"torch.optim.{m.name}" for m in pkgutil.iter_modules(torch.optim.__path__)]
    return [importlib.import_module(n) for n in names]


@contextlib.contextmanager
def cuda_optimizer_defaults() -> Iterator[None]:
    """Torch optimizers pick ``foreach`` kernels, as they do on CUDA (on CPU they loop per tensor)."""

    def foreach_default(params, differentiable, use_fused=False):
        return False, not differentiable and not torch.jit.is_scripting()

    patched = [m for m in _optimizer_modules() if hasattr(m, "_default_to_fused_or_foreach")]
    saved = [m._default_to_fused_or_foreach for m in patched]
    for m in patched:
        m._default_to_fused_or_foreach = foreach_default
    try:
        yield
    finally:
        for m, original in zip(patched, saved):
            m._default_to_fused_or_foreach = original


@contextlib.contextmanager
def _numpy_placeholders(tracker: LiveStorageTracker) -> Iterator[None]:
    """``.numpy()`` of a fake tensor (e.g. losses handed to CMA-ES) gives placeholder values."""

    def numpy(tensor, *, force=False):
        tracker.data_dependent_values += tensor.numel()
        with unset_fake_temporarily():
            return torch.full(tuple(tensor.shape), _placeholder(tensor), dtype=tensor.dtype).numpy()

    own = FakeTensor.__dict__.get("numpy")
    FakeTensor.numpy = numpy
    try:
        yield
    finally:
        if own is None:
            del FakeTensor.numpy
        else:
            FakeTensor.numpy = own


@contextlib.contextmanager
def _foreach_for_fake_tensors() -> Iterator[None]:
    """Utilities that choose foreach kernels by tensor type (clip_grad_norm_) take fake tensors
    for plain ones, as on CUDA."""
    from torch.utils import _foreach_utils

    _foreach_utils._foreach_supported_types.append(FakeTensor)
    try:
        yield
    finally:
        _foreach_utils._foreach_supported_types.remove(FakeTensor)


@contextlib.contextmanager
def _storage_replacements_seen(tracker: LiveStorageTracker) -> Iterator[None]:
    """``tensor.data = other`` and ``torch.utils.swap_tensors`` replace a tensor's storage
    without an operator the tracker sees: the next sweep then reads every use count."""
    data, swap = torch._C.TensorBase.data, torch.utils.swap_tensors

    def set_data(tensor, value):
        tracker.sweep_all_next = True
        data.__set__(tensor, value)

    def swap_seen(t1, t2):
        tracker.sweep_all_next = True
        tracker.unwatch(t1, t2)  # swap_tensors refuses tensors with weak references
        return swap(t1, t2)

    own = torch.Tensor.__dict__.get("data")  # an enclosing tracker's
    torch.Tensor.data = property(lambda tensor: data.__get__(tensor, type(tensor)), set_data)
    torch.utils.swap_tensors = swap_seen
    try:
        yield
    finally:
        if own is None:
            del torch.Tensor.data
        else:
            torch.Tensor.data = own
        torch.utils.swap_tensors = swap


@contextlib.contextmanager
def _modules_convertible(mode: FakeTensorMode) -> Iterator[None]:
    """``nn.Module.to`` swaps fake parameters, which fails while the fake mode's tensor memo
    holds weak references to them; the memo only caches real->fake conversions."""
    original = torch.utils.swap_tensors

    def swap(t1, t2):
        mode.fake_tensor_converter.meta_converter.tensor_memo.clear()
        return original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


def _as_fake_subclass(fake: FakeTensor, cls: type, attributes: dict[str, Any]) -> FakeTensor:
    """``fake`` itself, now of ``cls``'s fake subclass and with ``attributes``."""
    fake.__class__ = _fake_subclass(cls)
    fake.__dict__.update(attributes)
    return fake


@functools.cache
def _fake_subclass(cls: type) -> type:
    """``cls`` (a tensor subclass such as Params4bit) that is also a FakeTensor: its methods
    first, fake dispatch underneath. ``detach`` keeps the class and attributes, as
    ``nn.Parameter`` requires (``Module.to`` swaps fake parameters for Parameters of them)."""
    if issubclass(cls, FakeTensor):
        return cls

    def detach(self):
        return _as_fake_subclass(torch.Tensor.detach(self), cls, vars(self))

    return type(f"Fake{cls.__name__}", (cls, FakeTensor), {"detach": detach})


@contextlib.contextmanager
def _bitsandbytes_fake() -> Iterator[None]:
    """bitsandbytes' Params4bit (QLoRA's 4-bit weight) is made by ``Tensor._make_subclass``,
    which refuses fake data. While a Params4bit is made, that call returns an alias of the fake
    data whose class is both Params4bit and FakeTensor; quantizing it then runs bitsandbytes'
    own code on the fake kernels bitsandbytes registers. The code table bitsandbytes caches for
    double quantization is made (of placeholders) under fake tensors: the cache is put back."""
    if importlib.util.find_spec("bitsandbytes") is None:
        yield
        return
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn import Params4bit

    original_new = Params4bit.__dict__["__new__"]
    new = original_new.__func__ if isinstance(original_new, staticmethod) else original_new
    make_subclass = torch.Tensor._make_subclass

    def make_fake_subclass(cls, data, requires_grad=False, *args, **kwargs):
        if not isinstance(data, FakeTensor):  # e.g. FakeTensor.__new__ itself
            return make_subclass(cls, data, requires_grad, *args, **kwargs)
        return _as_fake_subclass(torch.Tensor.detach(data).requires_grad_(requires_grad), cls, {})

    def fake_aware_new(cls, data=None, requires_grad=False, *args, **kwargs):
        torch.Tensor._make_subclass = make_fake_subclass
        try:
            return new(cls, data, requires_grad, *args, **kwargs)
        finally:
            torch.Tensor._make_subclass = make_subclass

    cached_maps = dict(bnb_functional.name2qmap)
    Params4bit.__new__ = staticmethod(fake_aware_new)
    try:
        yield
    finally:
        Params4bit.__new__ = original_new
        bnb_functional.name2qmap.clear()
        bnb_functional.name2qmap.update(cached_maps)


@contextlib.contextmanager
def _mixed_precision_as_on_cuda() -> Iterator[None]:
    """Autocast and the gradient scaler act on the fake GPU as on a real one (torch turns them off
    where no CUDA driver is found), bf16 counts as supported, and the scaler's skip-a-step test
    (a data-dependent read of the inf flag) takes every step."""
    from torch.amp import grad_scaler
    from torch.cuda.amp import common

    def maybe_step(self, optimizer, optimizer_state, *args, **kwargs):
        found = optimizer_state["found_inf_per_device"].values()
        if any(isinstance(v, FakeTensor) for v in found):
            return optimizer.step(*args, **kwargs)
        return original_step(self, optimizer, optimizer_state, *args, **kwargs)

    original_step = grad_scaler.GradScaler._maybe_opt_step
    patched = [
        (common, "amp_definitely_not_available", lambda: False),
        (torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True),
        (grad_scaler.GradScaler, "_maybe_opt_step", maybe_step),
    ]
    originals = [getattr(owner, name) for owner, name, _ in patched]
    for owner, name, value in patched:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), original in zip(patched, originals):
            setattr(owner, name, original)


@contextlib.contextmanager
def _bitsandbytes_optimizers_fake() -> Iterator[None]:
    """bitsandbytes' 8-bit optimizers build their code tables from Python numbers (real tensors,
    as on a GPU) and synchronize the GPU after each tensor's update (nothing to wait for)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        yield
        return
    from bitsandbytes.optim import optimizer as bnb_optimizer

    fill_qmap, sync_gpu = bnb_optimizer.Optimizer8bit.fill_qmap, bnb_optimizer.sync_gpu

    def real_fill_qmap(self):
        with unset_fake_temporarily():
            fill_qmap(self)

    def sync_unless_fake(tensor):
        if not isinstance(tensor, FakeTensor):
            sync_gpu(tensor)

    bnb_optimizer.Optimizer8bit.fill_qmap, bnb_optimizer.sync_gpu = real_fill_qmap, sync_unless_fake
    try:
        yield
    finally:
        bnb_optimizer.Optimizer8bit.fill_qmap, bnb_optimizer.sync_gpu = fill_qmap, sync_gpu


def _shapes_only(quantize, outputs):
    """``quantize`` for a fake weight: new tensors of the shapes and dtypes ``outputs(weight,
    *args)`` gives (the codes, scales, ...), without the arithmetic (tens of fake operators per
    layer). Every output of the real quantizer is a new tensor, and its temporaries die inside
    it, before the peaks are reset after setup: the same live storages after setup."""

    @functools.wraps(quantize)
    def shapes_only(weight, *args):
        if not isinstance(weight, FakeTensor):
            return quantize(weight, *args)
        return tuple(
            None if spec is None else torch.empty(spec[0], dtype=spec[1], device=weight.device)
            for spec in outputs(weight, *args)
        )

    return shapes_only


def _per_channel_outputs(
    weight, bits, symmetric, arithmetic="fp32", include_zero=True
):  # methods.common.quant.quantize_per_channel's
    rows = (weight.shape[0],)
    zero_point = None if symmetric else (rows, torch.int16)
    scale_dtype = weight.dtype if symmetric and arithmetic == "weight" else torch.float32
    return (tuple(weight.shape), torch.int16), (rows, scale_dtype), zero_point


def _affine_groups_outputs(
    weight, bits, group_size, arithmetic="fp32"
):  # methods.common.quant_groupwise.quantize_affine_groups'
    groups = (weight.numel() // group_size,)
    dtype = weight.dtype if arithmetic == "weight" else torch.float32
    return ((groups[0], group_size), torch.uint8), (groups, dtype), (groups, dtype)


@contextlib.contextmanager
def _fake_quantizers() -> Iterator[None]:
    """Our int8/int4 quantizers make the quantized weights of a fake weight directly."""
    from methods.common import quant, quant_groupwise

    patched = [
        (quant, "quantize_per_channel", _per_channel_outputs),
        (quant_groupwise, "quantize_affine_groups", _affine_groups_outputs),
    ]
    originals = [getattr(module, name) for module, name, _ in patched]
    for (module, name, outputs), original in zip(patched, originals):
        setattr(module, name, _shapes_only(original, outputs))
    try:
        yield
    finally:
        for (module, name, _), original in zip(patched, originals):
            setattr(module, name, original)


def quant_state_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of the quantization states (bitsandbytes' QuantState: absmax, code, offset,
    the nested state) that ``tensors`` (4-bit weights among them) carry."""
    out, states = [], [getattr(t, "quant_state", None) for t in tensors]
    while states:
        state = states.pop()
        if state is None:
            continue
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif hasattr(value, "absmax"):  # the nested QuantState of double quantization
                states.append(value)
    return out


@contextlib.contextmanager
def tracking(
    fake: bool = True, fast_quantizers: bool = True, watch_deaths: bool = True
) -> Iterator[LiveStorageTracker]:
    """An active tracker; with ``fake``, under fake tensors (and the patches they need). Torch
    optimizers use CUDA's defaults either way. ``fast_quantizers``: our quantizers give fake
    weights' codes and scales without computing them (``_fake_quantizers``). ``watch_deaths``:
    see ``LiveStorageTracker.sweep``."""
    tracker = LiveStorageTracker(fake)
    tracker.watch_deaths = watch_deaths
    with contextlib.ExitStack() as stack:
        stack.enter_context(_storage_replacements_seen(tracker))
        if fake:
            # The shape environment lets data-dependent shapes (boolean masks) through, as bounded symbols.
            mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()))
            tracker.fake_mode = mode
            stack.enter_context(_modules_convertible(mode))
            stack.enter_context(_numpy_placeholders(tracker))
            stack.enter_context(_foreach_for_fake_tensors())
            stack.enter_context(_bitsandbytes_fake())
            stack.enter_context(_bitsandbytes_optimizers_fake())
            stack.enter_context(_mixed_precision_as_on_cuda())
            if fast_quantizers:
                stack.enter_context(_fake_quantizers())
        stack.enter_context(cuda_optimizer_defaults())
        stack.enter_context(tracker)
        yield tracker
        tracker.sweep(everything=True)

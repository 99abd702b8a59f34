"""The one training loop for every method: seeding, steps, progress, checkpoint and resume.

Randomness: step s draws everything (noise, timesteps, ZO directions) from a CPU generator
seeded with (seed, s); which images it sees and their flips come from (seed, s) and (seed,
epoch) too (``methods.common.sampling``, ``method.data``). A resumed run therefore needs only the
method's state and the step number to continue bit-identically.

Faults: checkpoints are written atomically every ``checkpoint_every`` steps, so a kill costs at
most that many steps; on SIGTERM or SIGINT the loop finishes its step, writes a checkpoint and
raises :class:`TrainingInterrupted` (a second signal acts as usual). A NaN/inf loss raises
:class:`Diverged` with the step.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from methods.common.atomic import atomic_path
from methods.common.sampling import step_generator, training_batch

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"
TRAINED_NAME = "trained.json"  # training's record fields, written after the artifact: a rerun skips training


class Diverged(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step, self.loss = step, loss


class TrainingInterrupted(BaseException):
    """SIGTERM/SIGINT during training: a checkpoint was written; the same command resumes.
    A BaseException, like KeyboardInterrupt, so that a run does not record it as a failure."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} at step {step}: checkpoint {checkpoint} written; run the same command to resume"
        )
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float | None
    resumed_from: int


def save_checkpoint(path: Path, step: int, method, seconds: float, loss: float | None = None) -> None:
    state = {"step": step, "seconds": seconds, "loss": loss, "method": method.checkpoint()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk is an OSError
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path``, loaded to the CPU (the method's ``restore`` moves what it needs
    to its device). An unreadable one is moved aside to ``<name>.corrupt-<time>`` (nothing is
    deleted) with one warning line, and None is returned: training restarts from step 0."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many kinds; the file is what matters
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        log.warning("checkpoint %s is unreadable (%s); moved to %s, training restarts from step 0",
                    path, reason, aside)  # fmt: skip
        return None


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While inside, the first SIGTERM/SIGINT is noted in the yielded list instead of stopping
    the process; the previous handlers come back at once, so a second signal acts as usual."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # only the main thread may set handlers
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def note(signum, frame):
        received.append(signum)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for sig in previous:
        signal.signal(sig, note)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(
    method,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    seed: int,
    run_dir: Path,
    device: torch.device,
    checkpoint_every: int = 500,
    log_every: int = 50,
    progress: bool = True,
    monitor=None,
    after_step=None,
    step_delay_s: float = 0.0,
) -> TrainResult:
    """Run ``steps`` steps of ``method`` on ``images`` (N,3,H,W in [-1,1], CPU), resuming from
    ``run_dir/checkpoint.pt`` if present. Images are drawn as ``method.cfg.data`` says.
    ``after_step(n)`` (optional) is called once n steps are done (e.g. to snapshot the artifact
    for a learning curve). ``step_delay_s`` (tests only) sleeps after each step, so that a signal
    sent at some point lands mid-training on any machine; the numbers do not change."""
    ckpt_path = Path(run_dir) / CHECKPOINT_NAME
    start, seconds_before, loss_value = 0, 0.0, None
    state = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if state is not None:
        method.restore(state["method"])
        start, seconds_before, loss_value = state["step"], state["seconds"], state.get("loss")
        log.info("resuming from step %d (%s)", start, ckpt_path)
    images = images.to(device)
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc=method.name)
    with stop_signals() as received, bar:  # closed, the bar shows where training ended
        for step in bar:
            generator = step_generator(seed, step)
            batch = training_batch(images, method.cfg.data, seed, step, batch_size, generator)
            logs = method.step(batch, step)
            loss_value = float(logs["loss"])
            if not math.isfinite(loss_value):
                raise Diverged(step, loss_value)
            if monitor is not None:
                monitor.step_done()
            if after_step is not None:
                after_step(step + 1)
            if progress:
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if log_every and (step + 1) % log_every == 0:
                log.info("step %d/%d loss %.5f", step + 1, steps, loss_value)
            if step_delay_s and not received:
                time.sleep(step_delay_s)
            seconds = seconds_before + time.perf_counter() - t0
            if received:  # SIGTERM/SIGINT: keep this step's work
                save_checkpoint(ckpt_path, step + 1, method, seconds, loss_value)
                raise TrainingInterrupted(received[0], step + 1, ckpt_path)
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                save_checkpoint(ckpt_path, step + 1, method, seconds, loss_value)
    return TrainResult(steps, seconds_before + time.perf_counter() - t0, loss_value, start)


def release_memory(device: torch.device) -> None:
    """Free what finished training (or a failed run) held, before the next stage or job."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

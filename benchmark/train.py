"""The one training loop for every method: seeding, steps, progress, checkpoint and resume.

Randomness: step s draws everything (which images, noise, timesteps, ZO directions) from a
CPU generator seeded with (seed, s). A resumed run therefore needs only the method's state
and the step number to continue bit-identically.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmark.atomic import atomic_path

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"


class Diverged(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step, self.loss = step, loss


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float | None
    resumed_from: int


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def save_checkpoint(path: Path, step: int, method, seconds: float) -> None:
    with atomic_path(path) as tmp:
        torch.save({"step": step, "seconds": seconds, "method": method.checkpoint()}, tmp)


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
) -> TrainResult:
    """Run ``steps`` steps of ``method`` on ``images`` (N,3,H,W in [-1,1], CPU), resuming from
    ``run_dir/checkpoint.pt`` if present."""
    ckpt_path = Path(run_dir) / CHECKPOINT_NAME
    start, seconds_before = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        method.restore(state["method"])
        start, seconds_before = state["step"], state["seconds"]
        log.info("resuming from step %d (%s)", start, ckpt_path)
    images = images.to(device)
    loss_value = None
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, steps), initial=start, total=steps, disable=not progress, desc=method.name, leave=False
    )
    for step in bar:
        generator = step_generator(seed, step)
        index = torch.randint(len(images), (batch_size,), generator=generator)
        logs = method.step(
            {"pixel_values": images[index.to(device)], "generator": generator, "index": index}, step
        )
        loss_value = float(logs["loss"])
        if not math.isfinite(loss_value):
            raise Diverged(step, loss_value)
        if monitor is not None:
            monitor.step_done()
        if progress:
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        if log_every and (step + 1) % log_every == 0:
            log.info("step %d/%d loss %.5f", step + 1, steps, loss_value)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(ckpt_path, step + 1, method, seconds_before + time.perf_counter() - t0)
    return TrainResult(steps, seconds_before + time.perf_counter() - t0, loss_value, start)

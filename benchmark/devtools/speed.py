"""`python -m benchmark.devtools.speed --method M --baseline B [--device cpu] [--resolution 256] [--steps 3]`:
training it/s of method M (one with ``batched_passes``, e.g. ZOODiP) with sequential and with
batched forward passes, and of method B, in one process on one device, with model=sd15_arch
(random weights: speed needs none). M's model is loaded once and its sequential and batched
steps alternate (the same machine load for both); B follows. After setup, precompute (cached
latents) and one warm-up step each, ``--steps`` steps of each are timed, the method's own step
only, on 5 random images. Prints one line per variant, then the ratios; the last line is
``M batched/sequential it/s ratio: R``. `nox -s speed` runs it for ZOODiP against TI on the CPU
and, when one is present, on CUDA. ``--precision fp32`` (M's compute dtype): on a CPU without
fp16 kernels (no AVX512-FP16 or AMX) an fp16 ZOODiP step at 256 px costs tens of CPU-minutes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from benchmark import data, models
from benchmark.config import make_method, method_config, training_dtype
from benchmark.train import step_generator

CONF = Path(__file__).resolve().parents[2] / "conf"


def prepared(overrides: list[str], device: torch.device, steps: int, num_images: int = 5):
    """(method after setup and precompute, a function running its step s on random images)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    method_cfg = method_config(cfg)
    components = models.load_components(cfg.model, device=device, dtype=training_dtype(method_cfg))
    method = make_method(cfg, method_cfg)
    method.setup(components, data.get_subject("dog6"))
    size = method_cfg.resolution
    images = torch.rand(num_images, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    method.precompute(images, 0, steps + 1)
    images = images.to(device)

    def step(s: int) -> float:
        """Seconds of step ``s`` (reading the loss waits for the device)."""
        start = time.perf_counter()
        generator = step_generator(0, s)
        index = torch.randint(num_images, (method_cfg.batch_size,), generator=generator)
        batch = {"pixel_values": images[index.to(device)], "generator": generator, "index": index}
        float(method.step(batch, s)["loss"])
        return time.perf_counter() - start

    return method, step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, help="the method timed with sequential and batched passes")
    parser.add_argument(
        "--baseline", required=True, help="the method it is compared with (its config's dtype)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--precision",
        choices=("fp16", "fp32"),
        help="the method's compute dtype (default: its config's); fp32 on a CPU without fp16 kernels "
        "(no AVX512-FP16 or AMX), where fp16 runs tens of times slower than fp32",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    fixed = ["model=sd15_arch", f"model.resolution={args.resolution}"]
    where = f"{device.type} · sd15_arch · {args.resolution} px"
    # the method: one model, sequential and batched steps alternating, so that both see the same
    # machine load; one warm-up step of each first
    overrides = [f"method={args.method}", *([f"method.precision={args.precision}"] if args.precision else [])]
    method, step = prepared(fixed + overrides, device, 2 * args.steps + 1)
    name, method_where = args.method, f"{where} · {getattr(method.cfg, 'precision', 'fp32')}"
    seconds = {False: 0.0, True: 0.0}
    for s in range(2 * args.steps + 2):
        method.cfg.batched_passes = bool(s % 2)
        elapsed = step(s)
        seconds[method.cfg.batched_passes] += elapsed if s >= 2 else 0.0
    del method, step
    sequential, batched = f"{name} sequential", f"{name} batched"
    speeds = {sequential: args.steps / seconds[False], batched: args.steps / seconds[True]}
    for label in speeds:
        print(f"{method_where} · {label}: {speeds[label]:.3f} it/s", flush=True)
    baseline, step = prepared(fixed + [f"method={args.baseline}"], device, args.steps)
    step(0)  # warm-up
    speeds[args.baseline] = args.steps / sum(step(s) for s in range(1, args.steps + 1))
    baseline_precision = getattr(baseline.cfg, "precision", "fp32")
    print(
        f"{where} · {baseline_precision} · {args.baseline}: {speeds[args.baseline]:.3f} it/s",
        flush=True,
    )
    print(f"{sequential}/{args.baseline} it/s ratio: {speeds[sequential] / speeds[args.baseline]:.2f}")
    print(f"{batched}/{args.baseline} it/s ratio: {speeds[batched] / speeds[args.baseline]:.2f}")
    print(f"{name} batched/sequential it/s ratio: {speeds[batched] / speeds[sequential]:.2f}")


if __name__ == "__main__":
    main()

"""`python -m benchmark.speed [--device cpu] [--resolution 256] [--steps 3]`: training it/s of
ZOODiP with sequential and with batched forward passes, and of TI, in one process on one
device, with model=sd15_arch (random weights: speed needs none). Each variant loads the model,
runs setup and precompute (cached latents), one warm-up step, then times ``--steps`` steps of
the method itself on 5 random images. Prints one line per variant, then the ratios; the last
line is ``zoodip batched/sequential it/s ratio: R``. `nox -s speed` runs it on the CPU and, when
one is present, on CUDA.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from benchmark import data, models
from benchmark.config import method_config, training_dtype
from benchmark.train import step_generator
from methods.registry import method_class

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = {
    "zoodip sequential": ["method=zoodip", "method.batched_passes=false"],
    "zoodip batched": ["method=zoodip", "method.batched_passes=true"],
    "ti": ["method=ti"],
}


def it_per_s(overrides: list[str], device: torch.device, steps: int, num_images: int = 5) -> float:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    method_cfg = method_config(cfg)
    components = models.load_components(cfg.model, device=device, dtype=training_dtype(method_cfg))
    method = method_class(method_cfg.name)(method_cfg)
    method.setup(components, data.get_subject("dog6"))
    size = method_cfg.resolution
    images = torch.rand(num_images, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    method.precompute(images, 0, steps + 1)
    images = images.to(device)

    def step(s: int) -> None:
        generator = step_generator(0, s)
        index = torch.randint(num_images, (method_cfg.batch_size,), generator=generator)
        batch = {"pixel_values": images[index.to(device)], "generator": generator, "index": index}
        float(method.step(batch, s)["loss"])  # reading the loss waits for the device

    step(0)  # warm-up
    start = time.perf_counter()
    for s in range(1, steps + 1):
        step(s)
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    fixed = ["model=sd15_arch", f"model.resolution={args.resolution}"]
    speeds = {}
    for name, overrides in VARIANTS.items():
        speeds[name] = it_per_s(fixed + overrides, device, args.steps)
        print(
            f"{device.type} · sd15_arch · {args.resolution} px · {name}: {speeds[name]:.3f} it/s", flush=True
        )
    print(f"zoodip sequential/ti it/s ratio: {speeds['zoodip sequential'] / speeds['ti']:.2f}")
    print(f"zoodip batched/ti it/s ratio: {speeds['zoodip batched'] / speeds['ti']:.2f}")
    print(
        f"zoodip batched/sequential it/s ratio: {speeds['zoodip batched'] / speeds['zoodip sequential']:.2f}"
    )


if __name__ == "__main__":
    main()

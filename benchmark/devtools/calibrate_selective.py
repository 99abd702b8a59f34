"""Does a ZO-high step of selective BP-low / ZO-high do real work? Measured, per step kind.

From one BP-low-adapted start (``--adapt`` BP-low steps from the LoRA init), each step kind runs
``--steps`` steps (BP-low; ZO-high with each ``zo_optimizer`` x ``zo_lr`` candidate), ``--repeats``
times on different training draws, always restarting from the same start (LoRA, AdamW and
ZO-Adam state). Each is scored by the mean denoising loss on a fixed held-out set of
(image, noise, t) draws at the high resolution, the resolution the method targets. Printed:
mean loss descent per step (start minus end, over steps) with its spread over the repeats, and
the ratio to BP-low's. A ZO-high candidate supports a default when its descent is positive
beyond the spread.

``--long N``: the long run instead. From the same start, each step kind runs N steps as one
trajectory per candidate (the same training draws for every candidate; the trajectories advance
in lockstep, so a stopped run has them equally far), the held-out loss read and printed every
``--every`` steps: does a ZO-high step size that does more per step keep doing so over hundreds
of steps, or does its sign-like step (ZO-Adam, eps 1e-8: ~zo_lr per coordinate whatever the
estimate's signal) start to wander? (docs/methods.md, "The long run")

    python -m benchmark.devtools.calibrate_selective data.root=<dir>  # tiny model, CPU (nox)
    python -m benchmark.devtools.calibrate_selective model=sd15 data.root=<dir> --adapt 100 --steps 20
    python -m benchmark.devtools.calibrate_selective --long 200 --every 20 --adapt 10 --heldout 8 \
        --adam-lrs 1e-3,3e-3,1e-2 --no-bp-low model=sd15_arch method.high_resolution=64 data.root=<dir>
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmark import data, models
from benchmark.config import method_config
from benchmark.train import step_generator
from methods.common.base import require
from methods.common.conditioning import token_ids
from methods.common.diffusion import encode_latents, noisy_latents
from methods.common.sampling import training_batch
from methods.common.zo_adam import ZOAdam
from methods.selective import Selective, resize

HELDOUT_SEED = 1_000_000_007  # the held-out draws never coincide with a training step's


@dataclass
class HeldOut:
    z_t: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    text: torch.Tensor


def heldout_set(method: Selective, images: torch.Tensor, n_draws: int, seed: int = 0) -> HeldOut:
    """``n_draws`` fixed (image, noise, t) draws at the high resolution, t uniform over [0, T)."""
    c, cfg = method.c, method.cfg
    g = torch.Generator().manual_seed(HELDOUT_SEED + seed)
    index = torch.randint(len(images), (n_draws,), generator=g)
    pixels = resize(images[index], cfg.high_resolution).to(c.device)
    latents = encode_latents(c.vae, pixels, g)
    t = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (n_draws,), generator=g)
    z_t, target = noisy_latents(c.noise_scheduler, latents, t.to(c.device), g)
    with torch.no_grad():
        text = c.text_encoder(token_ids(c.tokenizer, [method.instance_prompt], c.device))[0]
    return HeldOut(z_t, t.to(c.device), target, text.expand(n_draws, -1, -1))


@torch.no_grad()
def heldout_loss(method: Selective, heldout: HeldOut, chunk: int = 4) -> float:
    """Mean denoising loss of the current LoRA over the held-out draws."""
    unet, total = method.c.unet, 0.0
    for i in range(0, len(heldout.z_t), chunk):
        part = slice(i, i + chunk)
        pred = unet(heldout.z_t[part], heldout.timesteps[part], heldout.text[part].to(unet.dtype)).sample
        total += float(method.loss(pred, heldout.target[part])) * len(pred)
    return total / len(heldout.z_t)


def run_steps(method: Selective, images, schedule: str, first_step: int, steps: int, seed: int) -> None:
    """``steps`` steps of one kind (``schedule`` = always_bp_low | always_zo_high), drawn as the
    training loop would draw steps first_step, first_step + 1, ..."""
    method.cfg.schedule = schedule
    for step in range(first_step, first_step + steps):
        g = step_generator(seed, step)
        method.step(training_batch(images, method.cfg.data, seed, step, method.cfg.batch_size, g), step)


def descent_per_step(method, start, images, heldout, schedule, first_steps, steps, seed) -> list[float]:
    """Held-out loss descent per step, one value per repeat, each from ``start``."""
    method.restore(copy.deepcopy(start))
    before = heldout_loss(method, heldout)
    out = []
    for first in first_steps:
        method.restore(copy.deepcopy(start))
        run_steps(method, images, schedule, first, steps, seed)
        out.append((before - heldout_loss(method, heldout)) / steps)
    return out


def build(cfg, method_cfg, subject) -> Selective:
    method = Selective(method_cfg)
    method.setup(models.load_components(cfg.model), subject)
    return method


def use_zo_update(method: Selective, optimizer: str, lr: float, normalize: bool) -> None:
    """Switch the ZO-high update of ``method`` in place (one model in memory for every
    candidate: SD1.5's would not fit four times); ``restore`` then resets the state."""
    method.cfg = dataclasses.replace(method.cfg, zo_optimizer=optimizer, zo_lr=lr, zo_normalize=normalize)
    params = list(method.params.values())
    method.zo_adam = ZOAdam(params, lr, eps=method.cfg.zo_adam_eps) if optimizer == "adam" else None


def adapted_start(cfg, adapt: int, n_heldout: int):
    """(method config, the subject's images, seed, the method after ``adapt`` BP-low steps, its
    checkpoint there, the held-out draws): where every compared trajectory starts."""
    base_cfg = method_config(cfg)
    subject = data.get_subject(cfg.subject, cfg.data)
    root = data.resolve_dataset_root(cfg.data.root, cfg.data.download, cfg.data.cache_dir)
    images = data.load_images(data.subject_image_paths(root, subject), base_cfg.resolution)
    seed = int(cfg.seed)
    method = build(cfg, base_cfg, subject)
    run_steps(method, images, "always_bp_low", 0, adapt, seed)
    start = method.checkpoint()  # a CPU snapshot (cpu_copy): later steps do not change it
    return base_cfg, images, seed, method, start, heldout_set(method, images, n_heldout, seed)


def calibrate(cfg, adapt: int, steps: int, repeats: int, n_heldout: int, candidates) -> list[dict]:
    """Rows (kind, zo_optimizer, zo_lr, zo_normalize, descent per step: mean, sd, ratio to BP-low)."""
    base_cfg, images, seed, method, start, heldout = adapted_start(cfg, adapt, n_heldout)
    first_steps = [adapt + r * steps for r in range(repeats)]

    rows = []
    bp = descent_per_step(method, start, images, heldout, "always_bp_low", first_steps, steps, seed)
    rows.append({"kind": "bp_low", "optimizer": "adamw", "lr": base_cfg.lr, "normalize": "-", "values": bp})
    for optimizer, lr, normalize in candidates:
        use_zo_update(method, optimizer, lr, normalize)
        values = descent_per_step(method, start, images, heldout, "always_zo_high", first_steps, steps, seed)
        rows.append(
            {
                "kind": "zo_high",
                "optimizer": optimizer,
                "lr": lr,
                "normalize": normalize,
                "values": values,
            }
        )
    bp_mean = statistics.fmean(bp)
    for row in rows:
        row["mean"] = statistics.fmean(row["values"])
        row["sd"] = statistics.stdev(row["values"]) if len(row["values"]) > 1 else 0.0
        row["ratio_to_bp_low"] = row["mean"] / bp_mean if bp_mean else float("nan")
    return rows


def long_run(cfg, adapt: int, steps: int, every: int, n_heldout: int, candidates, bp_low=True) -> list[dict]:
    """Rows (kind, zo_optimizer, zo_lr, zo_normalize, curve: held-out loss at 0, every, ..., steps).
    The trajectories advance in lockstep, ``every`` steps each in turn (each restored from its own
    checkpoint), so that all have run equally far whenever the run is stopped; every read-out is
    printed to stderr as it comes."""
    require(every >= 1 and steps >= every, f"--long {steps} --every {every}: need 1 <= every <= long")
    base_cfg, images, seed, method, start, heldout = adapted_start(cfg, adapt, n_heldout)
    start_loss = heldout_loss(method, heldout)
    rows = [{"kind": "bp_low", "optimizer": "adamw", "lr": base_cfg.lr, "normalize": "-"}] if bp_low else []
    rows += [{"kind": "zo_high", "optimizer": o, "lr": lr, "normalize": n} for o, lr, n in candidates]
    for row in rows:
        row["curve"], row["state"] = [start_loss], start
    for done in range(0, steps, every):
        for row in rows:
            if row["kind"] == "zo_high":
                use_zo_update(method, row["optimizer"], row["lr"], row["normalize"])
            method.restore(copy.deepcopy(row["state"]))
            schedule = f"always_{row['kind']}"
            run_steps(method, images, schedule, adapt + done, min(every, steps - done), seed)
            row["state"] = copy.deepcopy(method.checkpoint())
            row["curve"].append(heldout_loss(method, heldout))
            note = f"{row['kind']} lr {row['lr']:g} step {min(done + every, steps)}: {row['curve'][-1]:.6f}"
            print("  " + note, file=sys.stderr, flush=True)
    for row in rows:
        del row["state"]
    return rows


def print_long_run(rows: list[dict], every: int) -> None:
    """Held-out loss descent from the start (start minus loss) at each read-out."""
    points = range(0, every * (len(rows[0]["curve"]) - 1) + 1, every)
    print(f"start loss {rows[0]['curve'][0]:.6f}; descent (start - held-out loss) at each step:")
    print(f"{'kind':8} {'optimizer':9} {'lr':>8} " + "".join(f"{'step ' + str(s):>11}" for s in points[1:]))
    for r in rows:
        descents = [r["curve"][0] - loss for loss in r["curve"][1:]]
        print(f"{r['kind']:8} {r['optimizer']:9} {r['lr']:8.0e} " + "".join(f"{d:11.3e}" for d in descents))


def main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapt", type=int, default=20, help="BP-low steps before the start")
    parser.add_argument("--steps", type=int, default=10, help="steps of each kind per repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--heldout", type=int, default=8, help="held-out (image, noise, t) draws")
    parser.add_argument(
        "--adam-lrs",
        default="1e-4,1e-3",
        help="ZO-Adam (normalized RGE) zo_lr candidates, comma-separated; MeZO's ZO-SGD at 1e-5 always runs",
    )
    parser.add_argument("--long", type=int, default=0, help="the long run: N steps per kind in one go")
    parser.add_argument("--every", type=int, default=25, help="long run: held-out loss every K steps")
    parser.add_argument("--no-bp-low", action="store_true", help="long run: ZO-high candidates only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: model=tiny)")
    args = parser.parse_args(argv)
    adam = [("adam", float(lr), True) for lr in args.adam_lrs.split(",")]
    candidates = adam if args.long else [("sgd", 1e-5, False), *adam]
    has_model = any(o.startswith("model=") for o in args.overrides)
    overrides = ["method=selective", *([] if has_model else ["model=tiny"]), *args.overrides]
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if args.long:
        rows = long_run(cfg, args.adapt, args.long, args.every, args.heldout, candidates, not args.no_bp_low)
        print(
            f"selective long run: {' '.join(overrides)}; start = {args.adapt} BP-low steps; "
            f"{args.long} steps per kind, one trajectory each; {args.heldout} held-out draws"
        )
        print_long_run(rows, args.every)
        return
    rows = calibrate(cfg, args.adapt, args.steps, args.repeats, args.heldout, candidates)
    print(
        f"selective calibration: {' '.join(overrides)}; start = {args.adapt} BP-low steps; "
        f"{args.steps} steps x {args.repeats} repeats per kind; {args.heldout} held-out draws"
    )
    header = ("kind", "optimizer", "lr", "normalize", "descent/step", "sd", "vs BP-low")
    print("{:8} {:9} {:>8} {:>9} {:>13} {:>10} {:>9}".format(*header))
    for r in rows:
        print(
            f"{r['kind']:8} {r['optimizer']:9} {r['lr']:8.0e} {r['normalize']!s:>9} "
            f"{r['mean']:13.3e} {r['sd']:10.2e} {r['ratio_to_bp_low']:9.4f}"
        )


if __name__ == "__main__":
    main()

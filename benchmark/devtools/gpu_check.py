"""`python -m benchmark.devtools.gpu_check [--out DIR] [--dry-run] [--only CHECK ...]`: the checks
that need a CUDA GPU, in one call (`nox -s gpu_check`). One CSV row per case in
``DIR/gpu_check.csv`` (check, case, device, status, value, unit, detail); the last line printed is
``gpu_check: k/n passed on <device>``.

- ``method_run``: every method trains 3 steps on ``model=tiny`` and generates (fp16 on CUDA) and
  scores (``eval=smoke``) through ``python -m benchmark``: the CUDA paths with backward, real
  bitsandbytes kernels included.
- ``gfti_resume``: a GF-TI run killed (SIGKILL) after its first checkpoint, then the same command:
  it resumes and ends ``ok``; the detail says whether its artifact equals an uninterrupted run's.
- ``zo_finite_difference``: on ``sd15_arch`` (random weights), ZOODiP's central difference in its
  fp16 setting against the fp32 directional derivative (autograd) over 16 directions: the
  cosine of the two vectors (pass: >= 0.9), beside the fp32 central difference's.
- ``vae_fp16``: an SDXL-size VAE (``sdxl_arch``, 1024 px) encodes one image in fp16 and fp32: the
  relative error of the fp16 latents and whether they are finite (random weights: the released
  SDXL VAE's fp16 overflow is a property of its trained weights, which this cannot show).
- ``memory_gpu``: ``python -m benchmark.memory`` with ``measure=true predict=true`` for DreamBooth,
  TI, LoRA and ZOODiP on ``sd15_arch`` (its CSV beside this one).

``--dry-run`` runs the same code on the CPU at toy size (``model=tiny`` everywhere, fp32
generation, 64 px VAE, a subset of methods), to test the plumbing; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf

from methods.common.registry import method_names

REPO = Path(__file__).resolve().parents[2]
CONFIG = OmegaConf.load(REPO / "conf" / "gpu_check.yaml")  # which methods each check runs
FIELDS = ("check", "case", "device", "status", "value", "unit", "detail")
CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
COSINE_PASS = 0.9


class Context:
    def __init__(self, out: Path, dry_run: bool, methods: tuple[str, ...], data_root: Path | None):
        self.out, self.dry_run, self.methods = out, dry_run, methods
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=out))
        self.data_root = data_root or synthetic_dataset(self.scratch / "dataset")

    def row(self, check: str, case: str, ok: bool, value=None, unit: str = "", detail: str = "") -> dict:
        value = None if value is None else round(float(value), 6)
        status = "pass" if ok else "fail"
        return dict(check=check, case=case, device=str(self.device), status=status, value=value,
                    unit=unit, detail=detail)  # fmt: skip

    def cli(self, module: str, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", module, *args], cwd=REPO, env=CLI_ENV, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip

    def cheaper(self, method: str) -> list[str]:
        """The config's overrides that make ``method``'s check cheaper (a dry run's last)."""
        dry = list(CONFIG.dry_run.get(method, [])) if self.dry_run else []
        return [*CONFIG.cheaper.get(method, []), *dry]

    def run_args(self, method: str, results: Path, *extra: str) -> list[str]:
        return [
            f"method={method}", "model=tiny", "eval=smoke", f"device={self.device.type}",
            f"data.root={self.data_root}", f"paths.results={results}",
            "train.progress=false", "train.profile_steps=0", *extra,
        ]  # fmt: skip


def synthetic_dataset(root: Path, subject: str = "dog6", n: int = 5) -> Path:
    """A stand-in for the DreamBooth folder (a GPU machine may not have it): ``n`` seeded
    random images of ``subject``. Enough for code paths; the scores mean nothing."""
    from PIL import Image

    folder = root / subject
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(128, 128, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.jpg")
    return root


def compose(overrides: list[str]):
    """The run config of ``python -m benchmark <overrides>``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def record_of(results: Path, method: str) -> dict | None:
    found = sorted(results.glob(f"runs/{method}/*/*/record.json"))
    return json.loads(found[0].read_text()) if found else None


def method_run(ctx: Context) -> Iterator[dict]:
    for method in ctx.methods:
        results = ctx.scratch / f"run-{method}"
        extra = ctx.cheaper(method)
        done = ctx.cli("benchmark", *ctx.run_args(method, results, "train.max_steps=3", *extra))
        record = record_of(results, method) or {}
        loss = record.get("final_loss")
        ok = (
            done.returncode == 0 and record.get("status") == "ok" and loss is not None and math.isfinite(loss)
        )
        detail = f"clip_t {record.get('clip_t')}" if ok else f"exit {done.returncode}: {tail(done.stderr)}"
        yield ctx.row("method_run", method, ok, record.get("train_seconds"), "s", detail)


def gfti_resume(ctx: Context) -> Iterator[dict]:
    method = CONFIG.resume_method
    args = [*ctx.cheaper(method), "train.max_steps=6", "train.checkpoint_every=1"]
    straight, killed = ctx.scratch / "gfti-straight", ctx.scratch / "gfti-killed"
    reference = ctx.cli("benchmark", *ctx.run_args(method, straight, *args))
    with open(ctx.scratch / "gfti-killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmark", *ctx.run_args(method, killed, *args, "train.step_delay_s=1")],
            cwd=REPO, env=CLI_ENV, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 900
        while not list(killed.glob("runs/gfti/*/*/checkpoint.pt")) and proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rerun = ctx.cli("benchmark", *ctx.run_args(method, killed, *args))
    resumed = record_of(killed, method) or {}
    from_step = resumed.get("resumed_from_step") or 0
    ok = rerun.returncode == 0 and resumed.get("status") == "ok" and from_step >= 1
    same = [p.read_bytes() for p in (*killed.glob("runs/gfti/*/*/*.safetensors"),
                                     *straight.glob("runs/gfti/*/*/*.safetensors"))]  # fmt: skip
    identical = len(same) == 2 and same[0] == same[1] and reference.returncode == 0
    detail = (
        f"resumed from step {from_step}; artifact {'equals' if identical else 'differs from'} "
        "the uninterrupted run's"
        if ok
        else f"exit {rerun.returncode}: {tail(rerun.stderr)}"
    )
    yield ctx.row("gfti_resume", "kill after first checkpoint", ok, from_step, "step", detail)


def _zo_method(model: str, precision: str, device: torch.device):
    from benchmark import data, models
    from benchmark.config import method_config, training_dtype
    from methods.common.registry import method_class

    method = CONFIG.finite_difference_method
    cfg = compose([f"model={model}", f"method={method}", f"method.precision={precision}"])
    method_cfg = method_config(cfg)
    components = models.load_components(cfg.model, device=device, dtype=training_dtype(method_cfg))
    zo_method = method_class(method_cfg.name)(method_cfg)
    zo_method.setup(components, data.get_subject("dog6"))
    return zo_method


def zo_finite_difference(ctx: Context) -> Iterator[dict]:
    from benchmark.train import step_generator

    model, n = ("tiny", 2) if ctx.dry_run else ("sd15_arch", 16)
    fp32 = _zo_method(model, "fp32", ctx.device)
    half = _zo_method(model, "fp16", ctx.device)
    size = fp32.cfg.resolution
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0), device="cpu") * 2 - 1
    batch = {"pixel_values": images.to(ctx.device), "generator": step_generator(0, 0)}
    z_t, t, target, ids = fp32.denoising_inputs(batch)
    mu = half.cfg.mu
    directions = torch.randn(n, fp32.token.numel(), generator=torch.Generator().manual_seed(1)).to(ctx.device)

    token = fp32.token.detach().clone().requires_grad_(True)
    _, losses32 = fp32.loss_functions(z_t, t, target, ids)
    (grad,) = torch.autograd.grad(losses32([(token,)]).sum(), token)
    derivative = directions @ grad.flatten()

    def central(method, inputs) -> torch.Tensor:
        _, losses = method.loss_functions(*inputs)
        base = method.token.detach()
        with torch.no_grad():
            diffs = [losses([(base + mu * d,), (base - mu * d,)]).float() for d in directions]
        return torch.stack([(d[0] - d[1]) / (2 * mu) for d in diffs])

    half_inputs = (z_t.to(torch.float16), t, target.to(torch.float16), ids)
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))  # noqa: E731
    fd16, fd32 = central(half, half_inputs), central(fp32, (z_t, t, target, ids))
    c16, c32 = cos(fd16.cpu(), derivative.cpu()), cos(fd32.cpu(), derivative.cpu())
    ok = math.isfinite(c16) and c16 >= COSINE_PASS
    detail = f"{model}, mu {mu}, {n} directions; fp32 central difference: cosine {c32:.4f}"
    yield ctx.row("zo_finite_difference", "fp16 vs fp32 autograd", ok, c16, "cosine", detail)


def vae_fp16(ctx: Context) -> Iterator[dict]:
    from benchmark import models

    model, size = ("tiny_sdxl", 64) if ctx.dry_run else ("sdxl_arch", 1024)
    cfg = compose([f"model={model}"])
    vae = models.build_from_config(cfg.model).vae.to(ctx.device)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(ctx.device) * 2 - 1
    with torch.no_grad():
        reference = vae.encode(image).latent_dist.mean
        half = torch.nn.Module.to(vae, torch.float16).encode(image.half()).latent_dist.mean.float()
    finite = bool(torch.isfinite(half).all())
    error = float((half - reference).norm() / reference.norm()) if finite else float("inf")
    ok = finite and error < 1e-2
    detail = f"{model} VAE at {size} px (random weights), fp16 latents {'finite' if finite else 'not finite'}"
    yield ctx.row("vae_fp16", f"{size} px encode", ok, error, "relative error", detail)


def memory_gpu(ctx: Context) -> Iterator[dict]:
    table = ctx.out / "memory.csv"
    table.unlink(missing_ok=True)
    methods = ",".join(m for m in CONFIG.memory_methods if m in ctx.methods or not ctx.dry_run)
    model = ["model=tiny"] if ctx.dry_run else []
    done = ctx.cli(
        "benchmark.memory", "-m", f"method={methods}", "measure=true", "predict=true",
        f"device={ctx.device.type}", f"csv={table}", *model,
    )  # fmt: skip
    rows = list(csv.DictReader(table.open())) if table.exists() else []
    for method in methods.split(","):
        row = next((r for r in rows if r["method"] == method and not r.get("variant")), None)
        measured = row and row.get("peak_allocated_bytes")
        ok = done.returncode == 0 and row is not None and (ctx.dry_run or bool(measured))
        value = float(measured) / 10**9 if measured else None
        detail = (
            f"predicted {float(row['predicted_peak_bytes']) / 10**9:.3f} GB"
            if row and row.get("predicted_peak_bytes")
            else f"exit {done.returncode}: {tail(done.stderr)}"
        )
        yield ctx.row("memory_gpu", method, ok, value, "GB allocator peak", detail)


CHECKS: dict[str, Callable[[Context], Iterator[dict]]] = {
    "method_run": method_run,
    "gfti_resume": gfti_resume,
    "zo_finite_difference": zo_finite_difference,
    "vae_fp16": vae_fp16,
    "memory_gpu": memory_gpu,
}


def run_checks(
    out: Path, dry_run: bool, only: list[str], methods: tuple[str, ...], data_root: Path | None = None
) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out, dry_run, methods, data_root)
    rows: list[dict] = []
    for name in only or CHECKS:
        try:
            for row in CHECKS[name](ctx):
                print(f"{row['check']:22} {row['case']:28} {row['status']:5} {row['value']} {row['unit']}  "
                      f"{row['detail']}", flush=True)  # fmt: skip
                rows.append(row)
        except Exception as e:  # one broken check must not hide the others' results
            rows.append(ctx.row(name, "(raised)", False, detail=f"{type(e).__name__}: {e}"))
            print(f"{name:22} raised {type(e).__name__}: {e}", flush=True)
        write_rows(out / "gpu_check.csv", rows)
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    import io

    from methods.common.atomic import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gpu_check")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: the plumbing only")
    parser.add_argument("--only", nargs="*", default=[], choices=sorted(CHECKS), metavar="CHECK")
    parser.add_argument("--methods", nargs="*", default=None, choices=method_names(), metavar="METHOD",
                        help="methods for method_run (default: all nine and LoRA)")  # fmt: skip
    parser.add_argument("--data-root", type=Path, default=None,
                        help="the DreamBooth dataset (default: random stand-in images of dog6)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run runs "
              "its plumbing on the CPU", file=sys.stderr)  # fmt: skip
        return 2
    methods = tuple(args.methods) if args.methods is not None else tuple(method_names())
    rows = run_checks(args.out, args.dry_run, args.only, methods, args.data_root)
    passed = sum(r["status"] == "pass" for r in rows)
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    print(f"gpu_check: {passed}/{len(rows)} passed on {name} ({args.out / 'gpu_check.csv'})")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Developer sessions. They run in the Python that runs nox (install once: `bash .ci/install`,
then `.venv/bin/nox -s <session>`), so no session reinstalls torch."""

from __future__ import annotations

import os
import sys

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU, tiny models, ../shared/dreambooth images)."""
    session.run(sys.executable, "-m", "pytest", "-n", "2", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    paths = ["benchmark", "methods", "tests", "noxfile.py"]
    session.run(sys.executable, "-m", "ruff", "check", *paths)
    session.run(sys.executable, "-m", "ruff", "format", "--check", "--diff", *paths)


# One step of a method on SD1.5's architecture (random weights), in a fresh process so that
# the peak RSS is this method's alone.
_ARCH_STEP = """
import pathlib, resource, sys, time, torch
from hydra import compose, initialize_config_dir
from benchmark import data, models
from benchmark.config import method_config
from benchmark.train import step_generator
from methods.common.registry import method_class

name, device = sys.argv[1], torch.device(sys.argv[2])
with initialize_config_dir(config_dir=str(pathlib.Path("conf").resolve()), version_base="1.3"):
    cfg = compose(config_name="config", overrides=["model=sd15_arch", f"method={name}"])
method_cfg = method_config(cfg)
t0 = time.perf_counter()
components = models.load_components(cfg.model, device=device)
method = method_class(name)(method_cfg)
method.setup(components, data.get_subject("dog6"))
t1 = time.perf_counter()
size = method_cfg.resolution
images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
loss = method.step({"pixel_values": images.to(device), "generator": step_generator(0, 0)}, 0)["loss"]
t2 = time.perf_counter()
rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"{name}: {method_cfg.resolution}px load+setup {t1 - t0:.1f} s, one step {t2 - t1:.1f} s, "
      f"loss {float(loss):.4f}, peak RSS {rss_gib:.2f} GiB")
"""


@nox.session
def arch_step(session: nox.Session) -> None:
    """One training step of each gradient baseline with model=sd15_arch at 512 px (CPU by
    default): `nox -s arch_step -- [device] [method ...]`. Prints seconds and peak RSS."""
    args = list(session.posargs)
    device = args.pop(0) if args and args[0].startswith(("cpu", "cuda")) else "cpu"
    for name in args or ["dreambooth", "qlora", "peqa", "tuneqdm"]:
        session.run(sys.executable, "-c", _ARCH_STEP, name, device, env={"HF_HUB_OFFLINE": "1"})


REPORTS = ("table1", "fig1", "table4", "fig7", "fig8")


@nox.session
def paper(session: nox.Session) -> None:
    """Every report's tables and figures in one PDF (pdflatex; `bash .ci/setup.d/10-report-tools.sh`):
    `nox -s paper -- [overrides]` reports table1, fig1, table4, fig7 and fig8 from the records
    under paths.results (default results/; missing runs are counted, not run), then compiles
    <paths.results>/pdf/paper.pdf."""
    overrides = list(session.posargs)
    results = next((o.split("=", 1)[1] for o in overrides if o.startswith("paths.results=")), "results")
    for name in REPORTS:
        session.run(sys.executable, "-m", "benchmark.report", f"experiment={name}", *overrides)
    session.run(sys.executable, "-m", "benchmark.report.paper", f"results={results}")


# Memory: the Table 1 column at SD1.5 / 512 px / batch 1, predicted and measured.
MEMORY_METHODS = (
    "dreambooth,qlora,peqa,tuneqdm,ti,gfti,zoodip,hollowed,selective,"
    "custom_diffusion,loha,lokr,oft,boft,vera"  # beyond the papers
)
MEMORY_CSV = "results/memory/sd15_predicted.csv"
# Each backprop method also at its leanest standard setting (methods/common/savers.py): fp16 mixed
# precision, gradient checkpointing and 8-bit AdamW, a row of its own.
BACKPROP_MEMORY_METHODS = "dreambooth,qlora,peqa,tuneqdm,ti,hollowed,selective"
LEANEST = ["train.mixed_precision=fp16", "train.gradient_checkpointing=true", "method.optimizer=adamw8bit"]
# ZOODiP's memory and speed options, each a row: the defaults are cache_latents and
# compact_vocabulary on, passes sequential.
ZOODIP_MEMORY_VARIANTS = [
    ["method=zoodip", "method.cache_latents=false", "method.compact_vocabulary=false"],
    ["method=zoodip", "method.compact_vocabulary=false"],
    ["method=zoodip", "method.batched_passes=true"],
    ["method=ti", "method.cache_latents=false"],
    ["method=gfti", "method.cache_latents=false"],
]


def memory_runs(session: nox.Session, *fixed: str) -> None:
    """`python -m benchmark.memory -m` over every method (or the session's overrides), into
    MEMORY_CSV, then the table."""
    # Selective's first steps are all BP-low (its schedule starts there): ZO-high gets a row of its own.
    runs = [session.posargs] if any(o.startswith("method=") for o in session.posargs) else [
        [f"method={MEMORY_METHODS}", *session.posargs],
        [f"method={BACKPROP_MEMORY_METHODS}", *LEANEST, *session.posargs],
        # plain LoRA (the diffusers recipe; Hollowed Net's baseline), fp32 and leanest: a row each
        ["method=lora", *session.posargs],
        ["method=lora", *LEANEST, *session.posargs],
        ["method=selective", "method.schedule=always_zo_high", *session.posargs],
        *[[*variant, *session.posargs] for variant in ZOODIP_MEMORY_VARIANTS],
    ]  # fmt: skip
    for overrides in runs:
        session.run(
            sys.executable, "-m", "benchmark.memory", "-m", "model=sd15_arch", f"csv={MEMORY_CSV}",
            *fixed, *overrides, env={"HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    csv = next((o.split("=", 1)[1] for o in session.posargs if o.startswith("csv=")), MEMORY_CSV)
    session.run(sys.executable, "-c", f"from benchmark.memory.cli import show; show({csv!r})")


@nox.session
def memory(session: nox.Session) -> None:
    """Predicted peak training memory of every method at SD1.5 / 512 px / batch 1, on a CPU with
    no weights (benchmark/memory/estimate.py): writes results/memory/sd15_predicted.csv next to
    the paper's Table 1 and prints it. `nox -s memory -- method=ti,zoodip` for a subset."""
    memory_runs(session)


@nox.session
def startup(session: nox.Session) -> None:
    """CPU seconds of each process kind the suite and sweeps start (run, refused run, sweep
    status, report, memory), whole process and its imports (benchmark/devtools/startup_cost.py).
    `nox -s startup -- --repeat 1 run`."""
    session.run(
        sys.executable, "-m", "benchmark.devtools.startup_cost", *session.posargs, env={"HF_HUB_OFFLINE": "1"}
    )


@nox.session
def speed(session: nox.Session) -> None:
    """Training it/s of ZOODiP sequential vs batched passes and of TI, with model=sd15_arch at
    256 px, on the CPU and on CUDA when present (benchmark/devtools/speed.py); prints the ratios,
    the last line `zoodip batched/sequential it/s ratio: R`. `nox -s speed -- --steps 5`."""
    import torch  # nox runs in the project's Python

    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        # CPU: ZOODiP in fp32 (fp16 runs tens of times slower on CPUs without fp16 kernels);
        # `-- --precision fp16` overrides it
        precision = ["--precision", "fp32"] if device == "cpu" else []
        speed = ["-m", "benchmark.devtools.speed", "--method", "zoodip", "--baseline", "ti"]
        speed += ["--device", device]
        session.run(sys.executable, *speed, *precision, *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def memory_gpu(session: nox.Session) -> None:
    """Measured peaks on a CUDA GPU: each method trains 4 steps with model=sd15_arch (random
    weights) and the allocator and NVML peaks join its row of results/memory/sd15_predicted.csv,
    with the prediction's error. Needs a CUDA GPU and the project's packages (torch, diffusers,
    transformers, peft, bitsandbytes, hydra-core, nvidia-ml-py); installs nothing.
    `nox -s memory_gpu -- method=zoodip predict=true` to predict on that machine too."""
    session.run(
        sys.executable, "-c",
        "import torch, diffusers, transformers, peft, bitsandbytes, hydra, pynvml, cma; "
        "assert torch.cuda.is_available(), 'nox -s memory_gpu needs a CUDA GPU'",
    )  # fmt: skip
    memory_runs(session, "measure=true", "predict=false")


@nox.session
def gpu_check(session: nox.Session) -> None:
    """The checks that need a CUDA GPU, in one call (benchmark/devtools/gpu_check.py): every method
    on `tiny` with backward and fp16 generation, a GF-TI kill-and-resume, ZOODiP's fp16 finite
    difference on `sd15_arch` against the fp32 derivative, an SDXL-size VAE encode in fp16 vs fp32,
    and the measured memory of DreamBooth, TI, LoRA and ZOODiP. One CSV (results/gpu_check/) and
    a summary line. `nox -s gpu_check -- --dry-run` runs the plumbing on the CPU at toy size."""
    session.run(sys.executable, "-m", "benchmark.devtools.gpu_check", *session.posargs)


@nox.session
def recovery(session: nox.Session) -> None:
    """Known-answer personalization: every arm of conf/experiment/recovery.yaml over its seeds
    on the tiny model (CPU; about an hour in one process), then the report (results/recovery/:
    table.md, table.csv, per_seed.csv, curves.png). `nox -s recovery -- seed=0,1 train.max_steps=50` for less;
    `nox -s recovery -- model=sd15 model.path=<dir> device=cuda` for real weights."""
    overrides = ["experiment=recovery", *session.posargs]
    session.run(sys.executable, "-m", "benchmark", "-m", *overrides, env={"HF_HUB_OFFLINE": "1"})
    session.run(sys.executable, "-m", "benchmark.report", *overrides)


@nox.session
def mutants(session: nox.Session) -> None:
    """Deliberate breakages (benchmark/devtools/mutants.py), each applied alone to a scratch copy
    of the tree, running only the recovery tests meant to catch it; the last line is
    `mutants caught: k/n` (about 15 CPU-minutes; not part of CI). `nox -s mutants -- <name> ...`
    for some of them."""
    session.run(sys.executable, "-m", "benchmark.devtools.mutants", *session.posargs)


@nox.session
def calibrate_selective(session: nox.Session) -> None:
    """Selective BP-low / ZO-high: mean held-out loss descent per step of each step kind (and
    each ZO-high candidate) from one BP-low-adapted start (benchmark/devtools/calibrate_selective.py).
    Tiny model on CPU by default: `nox -s calibrate_selective -- [--adapt N] [--steps K] [overrides]`."""
    args = list(session.posargs)
    if not any(a.startswith("data.root=") for a in args):
        args.append(f"data.root={os.environ.get('DREAMBOOTH_DATASET', '../shared/dreambooth/dataset')}")
    session.run(
        sys.executable, "-m", "benchmark.devtools.calibrate_selective", *args, env={"HF_HUB_OFFLINE": "1"}
    )


# The memory map: every method x {SD1.5, SD2.1, SDXL} at the native resolution, batch 1.
MEMORY_MODELS = "sd15_arch,sd21_arch,sdxl_arch"
MEMORY_MAP_CSV = "results/memory/predicted.csv"


@nox.session
def memory_models(session: nox.Session) -> None:
    """Predicted peak training memory of every method on SD1.5, SD2.1 and SDXL (architectures
    with no weights, fake tensors, CPU) into results/memory/predicted.csv, then the memory map
    (results/memory/memory_map.png) and its Markdown table; each backprop method also at its leanest
    setting (LEANEST). `-- method=ti,zoodip [train.mixed_precision=fp16 ...]` for a subset."""
    methods = [o for o in session.posargs if o.startswith("method=")]
    rest = [o for o in session.posargs if not o.startswith("method=")]
    runs = (
        [methods]
        if methods
        else [[f"method={MEMORY_METHODS}"], [f"method={BACKPROP_MEMORY_METHODS}", *LEANEST]]
    )
    for model in reversed(MEMORY_MODELS.split(",")):  # the largest first; each row lands as it is done
        for overrides in runs:
            session.run(
                sys.executable, "-m", "benchmark.memory", "-m", f"model={model}", f"csv={MEMORY_MAP_CSV}",
                "format=json", *overrides, *rest, env={"HF_HUB_OFFLINE": "1"},
            )  # fmt: skip
    session.run(sys.executable, "-m", "benchmark.memory.map", MEMORY_MAP_CSV)


# How far the official ZO-Adam (fp16 m and v, lr 1e-2) steps beyond ours
# (fp32, lr 5e-3), per gradient scale.
_ZO_ADAM_PRECISION = """
import torch
from methods.common.zo_adam import ZOAdam

def mean_step(state_dtype, lr, scale, steps=200):
    g = torch.Generator().manual_seed(0)
    token = torch.zeros(768, dtype=torch.float16 if state_dtype == "fp16" else torch.float32)
    adam, moved = ZOAdam([token], lr=lr, state_dtype=state_dtype), 0.0
    for _ in range(steps):
        before = token.float().clone()
        adam.step([torch.randn(768, generator=g) * scale])
        moved += (token.float() - before).abs().mean().item()
    return moved / steps

print("gradient std | step fp16/fp32 (lr 5e-3) | official (fp16, lr 1e-2) / ours (fp32, lr 5e-3)")
for scale in (1e-4, 1e-3, 3e-3, 1e-2, 1e-1):
    ours = mean_step("fp32", 5e-3, scale)
    fp16, official = mean_step("fp16", 5e-3, scale), mean_step("fp16", 1e-2, scale)
    print(f"{scale:12.0e} | {fp16 / ours:24.2f} | {official / ours:.2f}")
"""


@nox.session
def zo_adam_precision(session: nox.Session) -> None:
    """Mean per-coordinate ZO-Adam step over 200 steps of Gaussian gradients (768-d): fp16
    moments vs fp32, and the official setting (fp16, lr 1e-2) vs ours (fp32, lr 5e-3)."""
    session.run(sys.executable, "-c", _ZO_ADAM_PRECISION)


LOCK = ".ci/constraints.txt"


@nox.session(venv_backend="venv", reuse_venv=False)
def latest(session: nox.Session) -> None:
    """The whole suite against the newest releases pyproject.toml allows, without the lock, in a
    fresh venv (.nox/latest, ~6 GB): drift shows here before a fresh install meets it. Prints the
    packages that differ from the lock, then runs `.ci/test` in that venv.
    `nox -s latest -- --update-lock` rewrites .ci/constraints.txt from that venv if the suite passed."""
    update = "--update-lock" in session.posargs
    pytest_args = [a for a in session.posargs if a != "--update-lock"]
    session.install("--upgrade", "pip")
    session.install("--upgrade", "--upgrade-strategy", "eager", "-e", ".[test]")
    python = os.path.join(session.bin, "python")
    frozen = session.run(python, "-m", "pip", "freeze", "--exclude-editable", silent=True)
    newest = sorted(line for line in frozen.splitlines() if "==" in line)
    with open(LOCK) as f:
        locked = {line.strip() for line in f if "==" in line and not line.startswith("#")}
    drift = [line for line in newest if line not in locked]
    session.log(f"{len(drift)} of {len(newest)} packages differ from {LOCK}: {', '.join(drift) or 'none'}")
    session.run("bash", ".ci/test", *pytest_args, env={"PYTHON": python}, external=True)
    if update:
        with open(LOCK) as f:
            header = [line for line in f if line.startswith("#")]
        with open(LOCK, "w") as f:
            f.writelines(header + [line + "\n" for line in sorted(newest, key=str.lower)])
        session.log(f"{LOCK} rewritten from the passing venv")

"""`python -m benchmark.memory method=zoodip [model=sd15_arch] [format=json]` (Hydra; the entry point is
benchmark/memory/__main__.py, this module its work).

Prints a method's predicted peak training memory with its breakdown by category and by phase
(benchmark/memory/estimate.py: fake tensors, no GPU, no weights). ``-m method=a,b,c`` gives a
column. ``format=json`` prints one JSON object per configuration on its own line (all logging
goes to stderr). ``csv=<file>`` adds the configuration's row to a CSV, next to the paper's
Table 1 value; ``method.*`` overrides make a row of their own (column ``variant``).
``measure=true`` also trains a few steps for real on ``device`` and adds the measured
allocator and NVML peaks (None on a CPU). `nox -s memory` and `nox -s memory_gpu` use both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from benchmark.memory.estimate import Estimate, estimate
from benchmark.memory.profiling import CATEGORIES
from benchmark.memory.tracker import PHASES
from methods.common.atomic import write_text_atomic
from methods.common.savers import Savers

log = logging.getLogger(__name__)
GB = 10**9  # as the papers and results/paper/ (nvidia-smi's MiB are not converted)
GIB = 2**30
PAPER_TABLE = Path(__file__).resolve().parents[2] / "results" / "paper" / "table1.csv"
ROW_KEYS = ("method", "variant", "model", "resolution", "batch_size")
FORMATS = ("table", "json")
SHOWN = (
    "method", "variant", "predicted_peak_gb", "predicted_device_gb", "paper_memory_gb",
    "predicted_train_pflop", "measured_peak_allocated_gb", "measured_nvml_peak_gb",
    "predicted_error_percent", "error",
)  # fmt: skip
MEASURED = (
    "peak_allocated_bytes", "peak_reserved_bytes", "nvml_process_peak_bytes", "nvml_device_peak_bytes",
    "cuda_context_bytes", "it_per_s",
)  # fmt: skip


def paper_memory_gb(method: str, table: Path = PAPER_TABLE, model: str = "sd15_arch") -> float | None:
    """The paper's Table 1 memory (nvidia-smi, "GB") for ``method``, or None; Table 1 is SD1.5's,
    so None for other models."""
    if not table.exists() or not model.startswith("sd15"):
        return None
    rows = pd.read_csv(table)
    match = rows.loc[rows["method"] == method, "memory_gb"]
    return float(match.iloc[0]) if len(match) else None


def render(est: Estimate, measured: dict[str, Any] | None = None) -> str:
    """The human-readable table: bytes per category at the peak and at each phase's peak."""
    gb = lambda b: f"{'-':>8}" if b is None else f"{b / GB:8.3f}"  # noqa: E731
    title = (
        f"{est.method} · {est.model} · {est.resolution} px · batch {est.batch_size} · {est.dtype}: "
        f"predicted peak {est.peak_bytes / GB:.3f} GB"
    )
    header = f"  {'GB':<16}{'at peak':>10}" + "".join(f"{p:>11}" for p in PHASES)
    lines = [title, header]
    for category in CATEGORIES:
        phases = [est.phase_breakdown[p] for p in PHASES]
        values = [est.breakdown[category]] + [None if b is None else b[category] for b in phases]
        if any(values):
            lines.append(f"  {category:<16}  {gb(values[0])}" + "".join(f"   {gb(v)}" for v in values[1:]))
    totals = [est.peak_bytes] + [est.phase_peak_bytes[p] for p in PHASES]
    lines.append(f"  {'total':<16}  {gb(totals[0])}" + "".join(f"   {gb(v)}" for v in totals[1:]))
    lines.append(f"  after setup (model load): {est.after_setup_bytes / GB:.3f} GB")
    if est.predicted_device_bytes is not None:
        lines.append(
            f"  device level (as nvidia-smi): {est.predicted_device_bytes / GB:.3f} GB = "
            f"{est.predicted_device_bytes / GIB:.3f} GiB (allocator reserved "
            f"{est.predicted_reserved_bytes / GB:.3f} GB + CUDA context {est.cuda_context_bytes / GB:.3f} GB)"
        )
    paper = paper_memory_gb(est.method, model=est.model)
    if paper is not None:
        lines.append(f"  paper (ZOODiP Table 1, nvidia-smi): {paper} GB")
    for key, value in (measured or {}).items():
        lines.append(f"  measured {key}: " + ("n/a" if value is None else f"{value / GB:.3f} GB"))
    if est.data_dependent_values or est.data_dependent_shapes:
        lines.append(
            f"  {est.data_dependent_values} values read back to Python got placeholders; "
            f"{est.data_dependent_shapes} data-dependent sizes counted at their upper bound"
        )
    lines.append(
        f"  compute: {est.predicted_step_flops / 1e12:.3f} TFLOP a step x {est.train_steps} steps = "
        f"{est.predicted_train_flops / 1e15:.2f} PFLOP"
    )
    lines.append(f"  note: {est.not_included}; {est.seconds:.0f} s ({est.cpu_seconds:.0f} s CPU)")
    return "\n".join(lines)


def csv_row(keys: dict[str, Any], est: Estimate | None, measured: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {**keys, "paper_memory_gb": paper_memory_gb(keys["method"], model=keys["model"])}
    if est is not None:
        row["dtype"] = est.dtype
        row["predicted_peak_gb"] = round(est.peak_bytes / GB, 3)
        row["predicted_peak_bytes"] = est.peak_bytes
        row.update({f"predicted_{c}_bytes": v for c, v in est.breakdown.items()})
        row.update({f"predicted_{p}_peak_bytes": est.phase_peak_bytes[p] for p in PHASES})
        if est.predicted_device_bytes is not None:
            row["predicted_device_gb"] = round(est.predicted_device_bytes / GB, 3)
            row["predicted_device_gib"] = round(est.predicted_device_bytes / GIB, 3)
        row["predicted_step_tflop"] = round(est.predicted_step_flops / 1e12, 4)
        row["predicted_train_pflop"] = round(est.predicted_train_flops / 1e15, 3)
        row["predicted_train_flops"] = est.predicted_train_flops
        row["train_steps"] = est.train_steps
        row["predicted_device_bytes"] = est.predicted_device_bytes
        row["predicted_reserved_bytes"] = est.predicted_reserved_bytes
        row["cuda_context_bytes"] = est.cuda_context_bytes
        row["predicted_seconds"] = round(est.seconds, 1)
        row["predicted_cpu_seconds"] = round(est.cpu_seconds, 1)
    if measured:
        peak = measured.get("peak_allocated_bytes")
        row["measured_peak_allocated_gb"] = None if peak is None else round(peak / GB, 3)
        nvml = measured.get("nvml_process_peak_bytes") or measured.get("nvml_device_peak_bytes")
        row["measured_nvml_peak_gb"] = None if nvml is None else round(nvml / GB, 3)
        row.update({f"measured_{k}": v for k, v in measured.items()})
    return row


def prediction_error_percent(row: dict[str, Any]) -> float | None:
    """(predicted - measured allocator peak) / measured, in percent; None without both."""
    predicted, measured = row.get("predicted_peak_bytes"), row.get("measured_peak_allocated_bytes")
    if pd.isna(predicted) or pd.isna(measured) or not measured:  # pd.isna(None) is True
        return None
    return round(100 * (float(predicted) - float(measured)) / float(measured), 1)


def upsert_csv(path: Path, row: dict[str, Any]) -> pd.DataFrame:
    """Replace (or add) the row with the same method/model/resolution/batch size; columns the
    new row leaves None (e.g. measured ones) keep their old values, except ``error``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=list(row))
    wanted = pd.Series({k: str(row[k]) for k in ROW_KEYS})
    same = (table[list(ROW_KEYS)].astype(object).fillna("").astype(str) == wanted).all(axis=1)
    old = table[same].iloc[0].to_dict() if same.any() else {}
    merged = {**old, **{k: v for k, v in row.items() if v is not None or k not in old or k == "error"}}
    # a measure-only run (nox -s memory_gpu: predict=false) meets the row's earlier prediction here
    merged["predicted_error_percent"] = prediction_error_percent(merged)
    table = pd.concat([table[~same], pd.DataFrame([merged])], ignore_index=True)
    write_text_atomic(path, table.to_csv(index=False))
    return table


def measure(cfg: DictConfig, steps: int, num_images: int) -> dict[str, Any]:
    """Train ``steps`` steps for real on ``cfg.device`` (random weights; the train loop itself)
    and return the allocator and NVML peaks, keyed as in the run records (None on a CPU)."""
    from benchmark import data, models
    from benchmark.config import make_method, method_config, resolve_device, training_dtype
    from benchmark.memory.profiling import TrainingMonitor
    from benchmark.train import Diverged, train

    device = resolve_device(cfg.device)
    method_cfg = method_config(cfg)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    monitor = TrainingMonitor(device, profile_steps=0)
    components = models.load_components(cfg.model, device=device, dtype=training_dtype(method_cfg))
    method = make_method(cfg, method_cfg)
    method.setup(components, data.get_subject(cfg.subject, cfg.data))
    size = method_cfg.resolution
    images = torch.rand(num_images, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    method.precompute(images, int(cfg.seed), steps)
    monitor.loaded(components, method)
    with tempfile.TemporaryDirectory() as run_dir:
        try:
            train(method, images, steps, method_cfg.batch_size, int(cfg.seed), Path(run_dir), device,
                  checkpoint_every=0, log_every=0, progress=False, monitor=monitor)  # fmt: skip
        except Diverged as e:  # random weights: the memory is still what it is
            log.warning(
                "%s diverged on random weights (%s); memory measured all the same", method_cfg.name, e
            )
    summary = monitor.summary()
    del method, components
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {k: summary[k] for k in MEASURED}


def method_overrides() -> str:
    """The command line's ``method.*`` overrides (e.g. method.schedule=always_zo_high) and memory
    savers (``train.mixed_precision=fp16``, ...): a variant of the method's paper configuration
    gets its own row."""
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:  # composed outside a Hydra app (tests)
        return ""
    # a sweep's overrides come back as Hydra parsed them (True/False): as the command line has them
    overrides = [re.sub(r"=(True|False)$", lambda m: "=" + m[1].lower(), o) for o in overrides]
    savers = tuple(f"train.{f.name}=" for f in dataclasses.fields(Savers))
    return " ".join(sorted(o for o in overrides if o.startswith(("method.", *savers))))


def report(cfg: DictConfig) -> bool:
    """Predict (and with ``measure``, measure) one configuration; print it; add it to ``csv``.
    A method that cannot be predicted or measured is reported, and the sweep goes on: returns
    False then."""
    from benchmark.config import method_config
    from methods.common.base import ConfigError

    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r}; choose one of: {', '.join(FORMATS)}")
    method_cfg = method_config(cfg)
    keys = {"method": method_cfg.name, "variant": method_overrides(), "model": str(cfg.model.name),
            "resolution": method_cfg.resolution, "batch_size": method_cfg.batch_size}  # fmt: skip
    est = measured = error = None
    try:
        if cfg.predict:
            est = estimate(
                cfg, steps=int(cfg.steps), num_images=int(cfg.num_images),
                context_bytes=int(cfg.cuda_context_bytes),
            )  # fmt: skip
        if cfg.measure:
            measured = measure(cfg, int(cfg.steps) + 2, int(cfg.num_images))
    except ConfigError:
        raise
    except Exception as e:  # one method's failure is a result of the column, not the end of it
        log.exception("%s: memory %s failed", keys["method"], "measurement" if est else "prediction")
        error = f"{type(e).__name__}: {e}".splitlines()[0]
    if cfg.format == "json":
        print(
            json.dumps({**keys, **(est.as_dict() if est else {}), "measured": measured, "error": error}),
            flush=True,
        )
    elif est is not None:
        print(render(est, {k: v for k, v in (measured or {}).items() if k.endswith("_bytes")}), flush=True)
    else:
        print(f"{keys}: measured {measured}" if measured else f"{keys}: failed: {error}", flush=True)
    if cfg.csv:
        upsert_csv(Path(cfg.csv), {**csv_row(keys, est, measured), "error": error})
    return error is None


def show(csv: str | Path) -> None:
    """Print the CSV's main columns (nox -s memory / memory_gpu)."""
    table = pd.read_csv(csv, keep_default_na=False)
    columns = [c for c in SHOWN if c in table.columns]
    print(table[columns].astype(str).apply(lambda col: col.str.slice(0, 60)).to_string(index=False))


# conf/memory.yaml's own keys
MEMORY_KEYS = ("format", "steps", "num_images", "csv", "measure", "predict", "cuda_context_bytes")


def bad_values(cfg: DictConfig | dict) -> list[str]:
    """Every bad value of one configuration, one line each: checked for all of them before the
    first is estimated (benchmark.sweep.preflight), so bad input exits 2 and writes nothing."""
    from benchmark.schema import problems, resolved

    values = resolved(cfg)
    run_part = {k: v for k, v in values.items() if k not in MEMORY_KEYS}
    found = problems(run_part, check_device=bool(values["measure"]), inputs=False)
    context = values["cuda_context_bytes"]
    if not isinstance(context, int) or isinstance(context, bool) or context < 0:
        found.append(f"cuda_context_bytes={context!r}; use a whole number of bytes >= 0, e.g. 524288000")
    if values["format"] not in FORMATS:
        found.append(f"format={values['format']!r}; choose one of: {', '.join(FORMATS)}")
    if values["csv"]:
        folder = next(p for p in Path(values["csv"]).expanduser().absolute().parents if p.exists())
        if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            found.append(f"csv={values['csv']!r} cannot be written ({folder}); use a writable folder")
    return found

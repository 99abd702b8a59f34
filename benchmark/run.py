"""One run end to end: config, subject, model, method, train, artifact, generate, score, record.

Each stage hands the next plain data: the trained method leaves an artifact on disk, a fresh
stock pipeline loads it, generation leaves images on disk, the scorer turns them into numbers.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from benchmark import data, models
from benchmark.config import (
    LOCK_NAME,
    earlier_run_dir,
    flat,
    images_fingerprint,
    make_method,
    plain,
    real_run_dir,
    resolve_device,
    run_dir_for,
    subject_folder,
    training_dtype,
)
from benchmark.datasets import DREAMBOOTH
from benchmark.generate import eval_prompts, generate_images
from benchmark.memory.profiling import TrainingMonitor
from benchmark.metrics import MetricModelsUnavailable, Scorer
from benchmark.records import RECORD_NAME, CorruptRecord, new_record, read_record, write_record
from benchmark.schema import ValidRun, validate
from benchmark.train import CHECKPOINT_NAME, TRAINED_NAME, Diverged, release_memory, train
from methods.common.atomic import (
    DiskFull,
    exclusive_lock,
    is_out_of_space,
    write_json_atomic,
    write_text_atomic,
)
from methods.common.base import ConfigError
from methods.common.registry import method_class
from methods.common.savers import Savers

log = logging.getLogger(__name__)
# Problems the user must fix (bad config, missing weights or data): raised, never recorded.
USER_ERRORS = (
    ConfigError, data.DatasetUnavailable, models.WeightsUnavailable, MetricModelsUnavailable, CorruptRecord,
)  # fmt: skip
BUSY = "busy"  # run()'s answer when another process holds the run: nothing is written
IMAGE_SCORES_NAME = "scores.json"  # images/: each scored image's CLIP-T, CLIP-I, DINO (the gallery)


def is_oom(error: BaseException) -> bool:
    return (
        isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run (or skip, if already done) one configuration and leave a record.json. Bad input
    raises before anything is loaded; a run another process holds is left to it (status busy)."""
    checked = validate(cfg)  # every bad input fails here, before any model is loaded
    if checked.cfg.mode == "real":
        return run_real_images(cfg)
    run_dir = run_dir_for(cfg)
    adopt_earlier_run(cfg, run_dir)
    require_writable(run_dir)
    with exclusive_lock(run_dir / LOCK_NAME) as held:
        if not held:  # e.g. a second sweep into the same results dir: it moves on to its next run
            log.warning("busy: another process is running %s; skipped here", run_dir)
            return {"status": BUSY, "run_dir": str(run_dir)}
        return run_locked(cfg, checked, run_dir)


def adopt_earlier_run(cfg: DictConfig, run_dir: Path) -> None:
    """A run made under the earlier run key (data.root instead of the photos' fingerprint) is
    renamed to its current key, so a finished run is found (`already done`), not trained again."""
    earlier = earlier_run_dir(cfg)
    if run_dir.exists() or earlier is None or not earlier.is_dir():
        return
    with exclusive_lock(earlier / LOCK_NAME) as held:
        if not held:  # its process still runs it: left alone
            return
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        earlier.rename(run_dir)
    log.info("run folder %s is now %s (the run key names the subject's photos)", earlier, run_dir)


class ResultsUnwritable(ConfigError):
    """The run's folder cannot be created or written (permissions, an immutable or read-only
    folder, a file in its place)."""

    def __init__(self, run_dir: Path, error: OSError):
        super().__init__(
            f"cannot write the run folder {run_dir} ({error.strerror or error}); "
            "set paths.results=<a writable folder> or fix that folder's permissions"
        )


def require_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        if is_out_of_space(e):
            raise DiskFull(run_dir) from None
        raise ResultsUnwritable(run_dir, e) from None


def run_locked(cfg: DictConfig, checked: ValidRun, run_dir: Path) -> dict[str, Any]:
    method_cfg, subject, device = checked.method, checked.subject, checked.device
    if (run_dir / RECORD_NAME).exists():
        record = read_record(run_dir / RECORD_NAME)  # a corrupt record is refused, with its path
        if record["status"] == "ok":
            if cfg.skip_done:
                log.info("already done: %s", run_dir)
                return record
            clear_outputs(run_dir)  # skip_done=false: train, generate and time it all again
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    set_tf32(cfg.train.allow_tf32)
    base = record_base(cfg, run_dir, subject.name, str(device)) | device_fields(device)
    log.info("device: %s", ", ".join(f"{k}={v}" for k, v in device_fields(device).items()))
    if device.type == "cuda":  # peaks are per run, also for the second job of a sweep
        torch.cuda.reset_peak_memory_stats(device)
    # step 1 (the first with optimizer state) is profiled for the breakdown; train.profile_steps=0: off
    monitor = TrainingMonitor(device, profile_steps=cfg.train.profile_steps)
    try:
        fields = execute(cfg, method_cfg, subject, checked.image_paths, device, run_dir, monitor)
        record = new_record(**base, status="ok", **fields)
    except Diverged as e:
        record = new_record(
            **base, status="diverged", error=str(e), diverged_step=e.step, train_steps=e.step,
            **monitor.summary(),
        )  # fmt: skip
    except Exception as e:  # a failed run is a record, and a sweep goes on
        if isinstance(e, USER_ERRORS):
            raise
        status = "oom" if is_oom(e) else "failed"
        if is_out_of_space(e):  # one line: the traceback would only repeat it
            error_line = str(
                e if isinstance(e, DiskFull) else DiskFull(getattr(e, "filename", None) or run_dir)
            )
            log.error("run failed: %s", error_line)
        else:
            error_line = f"{type(e).__name__}: {e}".splitlines()[0]
            log.exception("run failed: %s", run_dir)
        record = new_record(**base, status=status, error=error_line, **monitor.summary())
    release_memory(device)  # what a failed run held goes with its traceback: free it for the next job
    write_record(run_dir, record)
    log.info("%s: %s", record["status"], run_dir / RECORD_NAME)
    return record


def record_base(cfg: DictConfig, run_dir: Path, subject: str, device: str) -> dict[str, Any]:
    return {
        "method": cfg.method.name, "subject": subject, "seed": cfg.seed, "run_key": run_dir.name,
        "model": cfg.model.name, "eval": cfg.eval.name, "device": device, **image_set_fields(cfg),
        "allow_tf32": bool(OmegaConf.select(cfg, "train.allow_tf32", default=False)),
        **flat(OmegaConf.to_container(cfg.method, resolve=True), "method."),
        **saver_fields(cfg),
    }  # fmt: skip


def saver_fields(cfg: DictConfig) -> dict[str, Any]:
    """The memory savers the run trained with (methods.common.savers), as train.<saver>."""
    savers = Savers(
        **{f.name: OmegaConf.select(cfg, f"train.{f.name}", default=f.default) for f in fields(Savers)}
    )
    return {f"train.{f.name}": getattr(savers, f.name) for f in fields(Savers)}


def set_tf32(allow: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions as train.allow_tf32 says (cuDNN's own default
    is on: set both, so that a run's fp32 means fp32 unless asked)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    torch.backends.cudnn.allow_tf32 = bool(allow)


def device_fields(device: torch.device) -> dict[str, Any]:
    """What the run ran on: the GPU's name and compute capability, the CUDA version torch was built
    with, the NVIDIA driver (NVML). All null on a CPU; the driver null where NVML cannot answer."""
    if device.type != "cuda":
        return dict.fromkeys(("gpu_name", "gpu_compute_capability", "cuda_version", "gpu_driver"))
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "gpu_name": torch.cuda.get_device_name(device),
        "gpu_compute_capability": f"{major}.{minor}",
        "cuda_version": torch.version.cuda,
        "gpu_driver": nvidia_driver_version(),
    }


def nvidia_driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver: the other fields still say what ran
        return None
    return version.decode() if isinstance(version, bytes) else version


def image_set_fields(cfg: DictConfig) -> dict[str, Any]:
    """Which photos the run used: their fingerprint (the run key's last part) and their folder."""
    values = plain(cfg)
    folder, _ = subject_folder(values)
    return {
        "data_images": images_fingerprint(values),
        "data_root": str(folder.resolve()),
        "dataset": (values.get("data") or {}).get("dataset", DREAMBOOTH),
    }


def record_refusal(cfg: DictConfig, error: Exception) -> Path | None:
    """A sweep's job whose input is refused (say model.path missing where the job runs) leaves a
    failed record, so that `benchmark.sweep.plan` and the report count it and the next sweep retries
    it. An ok record is kept; a corrupt one is left for the user to look at. Returns its path."""
    if isinstance(error, CorruptRecord) or OmegaConf.select(cfg, "mode") != "personalize":
        return None
    try:
        run_dir = run_dir_for(cfg)
        base = record_base(cfg, run_dir, str(cfg.subject), str(cfg.device))
    except Exception:  # the config itself does not resolve: no run directory to speak of
        return None
    try:
        with exclusive_lock(run_dir / LOCK_NAME) as held:
            record_path = run_dir / RECORD_NAME
            if not held or (record_path.exists() and read_record(record_path)["status"] == "ok"):
                return None
            error_line = f"{type(error).__name__}: {error}".splitlines()[0]
            return write_record(run_dir, new_record(**base, status="failed", error=error_line))
    except OSError:  # the folder cannot be written (the refusal may say so): nothing to record
        return None


def clear_outputs(run_dir: Path) -> None:
    (run_dir / TRAINED_NAME).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "images", ignore_errors=True)


def execute(cfg, method_cfg, subject, image_paths, device, run_dir: Path, monitor) -> dict[str, Any]:
    if cfg.mode == "recovery":  # known-answer experiment: teacher-made images, no CLIP/DINO
        from benchmark.recovery import run as recovery_run

        return recovery_run.execute(cfg, method_cfg, subject, image_paths, device, run_dir, monitor)
    trained_path = run_dir / TRAINED_NAME
    if trained_path.exists():  # killed after training: its artifact and record fields are on disk
        log.info("training already done (%s): evaluating", trained_path)
        trained = json.loads(trained_path.read_text())
    else:
        trained = train_and_save(cfg, method_cfg, subject, image_paths, device, run_dir, monitor)
    fields = dict(trained["fields"])
    artifact_path = run_dir / trained["artifact"]
    fields.update(evaluate(cfg, method_cfg, subject, image_paths, device, run_dir, artifact_path))
    return fields


def train_and_save(cfg, method_cfg, subject, image_paths, device, run_dir: Path, monitor) -> dict[str, Any]:
    """Train (resuming from a checkpoint), save the artifact, then the training's record fields."""
    images = data.load_images(image_paths, method_cfg.resolution)
    components = models.load_components(cfg.model, device=device, dtype=training_dtype(method_cfg))
    method = make_method(cfg, method_cfg)
    method.setup(components, subject)
    steps = min(method_cfg.steps, cfg.train.max_steps or method_cfg.steps)
    step_cap = cfg.train.max_steps if steps < method_cfg.steps else None
    if step_cap is not None:
        log.info(
            "training %d of method.steps=%d steps (train.max_steps=%d)", steps, method_cfg.steps, step_cap
        )
    method.precompute(images, cfg.seed, steps)  # e.g. Hollowed Net's stage 1
    monitor.loaded(components, method)  # the papers measure after quantization: setup counts as model load
    result = train(
        method, images, steps, method_cfg.batch_size, cfg.seed, run_dir, device,
        checkpoint_every=cfg.train.checkpoint_every, log_every=cfg.train.log_every,
        progress=cfg.train.progress, monitor=monitor, step_delay_s=cfg.train.step_delay_s,
    )  # fmt: skip
    artifact_path = method.save_artifact(run_dir)
    fields: dict[str, Any] = {
        "train_steps": result.steps, "train_step_cap": step_cap,
        "train_seconds": result.seconds, "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from, "artifact_bytes": artifact_path.stat().st_size,
        "trainable_params": sum(t.numel() for t in method.state_dict().values()),
        "forward_passes_per_step": None,  # ZO methods report theirs in record_extras
        **monitor.summary(), **method.record_extras(),
    }  # fmt: skip
    del method, components
    release_memory(device)
    trained = {"artifact": artifact_path.name, "fields": fields}
    write_json_atomic(run_dir / TRAINED_NAME, trained)
    (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)  # the artifact is what a user keeps
    return trained


def evaluate(
    cfg, method_cfg, subject, image_paths, device, run_dir: Path, artifact_path: Path
) -> dict[str, Any]:
    artifact = load_file(str(artifact_path))
    generation_dtype = torch.float16 if device.type == "cuda" else torch.float32
    method = method_class(cfg.method.name)(method_cfg)
    pipeline = personalized_pipeline(cfg.model, method, artifact, device, generation_dtype)
    prompts = eval_prompts(subject, method, cfg.eval)
    already_generated = len(list((run_dir / "images").glob("p*_*.png")))  # by a process that was killed
    t0 = time.perf_counter()
    paths = generate_images(pipeline, prompts, cfg.eval, cfg.seed, run_dir / "images")
    generation_seconds = time.perf_counter() - t0
    del pipeline
    release_memory(device)

    from PIL import Image

    k = cfg.eval.images_per_prompt
    generated, texts, names = [], [], []
    for prompt in prompts:
        for path in paths[prompt.index][:k]:
            generated.append(Image.open(path).convert("RGB"))
            texts.append(prompt.clip_text)
            names.append(path.name)
    inter_index = cfg.eval.dino_inter.prompt_index
    inter = [[Image.open(p).convert("RGB") for p in paths[inter_index]]] if inter_index in paths else None
    scorer = Scorer(cfg.eval, device=device)
    scores = scorer.score(generated, texts, data.load_pil_images(image_paths), inter_groups=inter)
    write_json_atomic(run_dir / "images" / IMAGE_SCORES_NAME, {
        "prompts": {f"p{p.index:02d}": p.prompt for p in prompts},
        "images": {
            name: {metric: (values[i] if values else None) for metric, values in scores.per_image.items()}
            for i, name in enumerate(names)
        },
    })  # fmt: skip
    return {
        "clip_t": scores.clip_t, "clip_i": scores.clip_i, "dino": scores.dino,
        "dino_inter": scores.dino_inter, "n_images": scores.n_images,
        "generation_seconds": generation_seconds,  # this process's share only, as it_per_s after a resume
        "generation_resumed_from_image": already_generated or None,  # images on disk when it started
    }  # fmt: skip


def personalized_pipeline(model_cfg, method, artifact, device, dtype: torch.dtype):
    """A stock pipeline with ``artifact`` applied, in ``dtype``. It is loaded in the dtype the
    method's ``apply`` needs (fp32 for methods that re-quantize the base) and cast afterwards."""
    pipeline = models.load_pipeline(model_cfg, device=device, dtype=method.apply_weights_dtype() or dtype)
    method.apply(pipeline, artifact)
    return models.cast_pipeline(pipeline, dtype)


def run_real_images(cfg: DictConfig) -> dict[str, Any]:
    """The upper-bound row of the DreamBooth paper: the subject's real images scored against
    each other (CLIP-I, DINO over pairs i != j). `python -m benchmark mode=real subject=dog6`."""
    subject = data.get_subject(cfg.subject, cfg.data)
    root = data.resolve_dataset_root(cfg.data.root, cfg.data.download, cfg.data.cache_dir)
    real = data.load_pil_images(data.subject_image_paths(root, subject))
    run_dir = real_run_dir(cfg)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    scores = Scorer(cfg.eval, device=resolve_device(cfg.device)).score_real(real)
    record = new_record(
        method="real", subject=subject.name, seed=None, status="ok", run_key=run_dir.name, model=None,
        eval=cfg.eval.name, clip_t=None, clip_i=scores.clip_i, dino=scores.dino, dino_inter=None,
        n_images=scores.n_images, **image_set_fields(cfg),
    )  # fmt: skip
    write_record(run_dir, record)
    return record

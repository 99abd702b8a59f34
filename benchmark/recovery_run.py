"""One recovery run (`mode=recovery`, set by `experiment=recovery`): teacher, teacher-made
images, training with snapshots, known-answer scores. See benchmark/recovery.py for the idea.

Resumable like a personalization run: the teacher and its images are stored in the run
directory (`teacher.safetensors`, `recovery_images.safetensors`), the curve's snapshots as
they are taken (`snapshots/`), and `trained.json` once training is over, so a rerun skips
what is done; the train loop resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file

from benchmark import models
from benchmark.atomic import write_json_atomic
from benchmark.config import config_error, training_dtype
from benchmark.recovery import (
    RecoveryConfig,
    curve_fields,
    curve_steps,
    draw_teacher,
    gap_closed,
    generate,
    heldout_scores,
    install,
    load_snapshot,
    prediction_distance,
    save_snapshot,
    save_tensors,
    snapshot_path,
    teacher_kind,
    token_scores,
)
from benchmark.train import CHECKPOINT_NAME, train
from methods.registry import method_class

log = logging.getLogger(__name__)
TEACHER_NAME = "teacher.safetensors"
IMAGES_NAME = "recovery_images.safetensors"


def recovery_config(cfg) -> RecoveryConfig:
    """cfg.recovery merged into RecoveryConfig; ConfigError naming a bad key or value."""
    try:
        values = OmegaConf.to_container(cfg.get("recovery") or {}, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RecoveryConfig), values))
    except OmegaConfBaseException as e:
        raise config_error(e, "recovery.") from None


def execute(cfg, method_cfg, subject, device, run_dir: Path, monitor) -> dict[str, Any]:
    from benchmark.run import TRAINED_NAME, release_memory

    rc = recovery_config(cfg)
    steps = min(method_cfg.steps, cfg.train.max_steps or method_cfg.steps)
    trained_path = run_dir / TRAINED_NAME
    if trained_path.exists():
        trained = json.loads(trained_path.read_text())
    else:
        trained = train_from_teacher(cfg, rc, method_cfg, subject, device, run_dir, steps, monitor)
        write_json_atomic(trained_path, trained)
        (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        release_memory(device)
    return {**trained["fields"], **score(cfg, rc, method_cfg, device, run_dir, trained)}


def train_from_teacher(cfg, rc, method_cfg, subject, device, run_dir, steps, monitor) -> dict[str, Any]:
    method = method_class(cfg.method.name)(method_cfg)
    components = models.load_components(cfg.model, device=device, dtype=training_dtype(method_cfg))
    method.setup(components, subject)
    kind = teacher_kind(method)
    prompt = rc.prompt.format(method.subject_phrase(subject))
    teacher, images = teacher_and_images(cfg, rc, method, kind, prompt, method_cfg, device, run_dir)
    method.precompute(images["train"], cfg.seed, steps)
    if not snapshot_path(run_dir, 0).exists():
        save_snapshot(run_dir, 0, method)  # the method's own initialization
    points = set(curve_steps(steps, rc.curve_points))

    def snapshot(done: int) -> None:
        if done in points:
            save_snapshot(run_dir, done, method)

    monitor.loaded(components, method)
    result = train(
        method, images["train"], steps, method_cfg.batch_size, cfg.seed, run_dir, device,
        checkpoint_every=cfg.train.checkpoint_every, log_every=cfg.train.log_every,
        progress=cfg.train.progress, monitor=monitor, after_step=snapshot,
    )  # fmt: skip
    artifact_path = method.save_artifact(run_dir)
    fields = {
        "train_steps": result.steps, "train_seconds": result.seconds, "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from, "artifact_bytes": artifact_path.stat().st_size,
        "trainable_params": sum(t.numel() for t in method.state_dict().values()),
        "forward_passes_per_step": None, **monitor.summary(), **method.record_extras(),
        "teacher_kind": kind, "recovery_prompt": prompt,
    }  # fmt: skip
    return {"artifact": artifact_path.name, "teacher_kind": kind, "prompt": prompt, "fields": fields}


def teacher_and_images(cfg, rc, method, kind, prompt, method_cfg, device, run_dir: Path):
    """The teacher (drawn from the seed) and the images the base model makes with it in place;
    from the run directory when a previous attempt stored them."""
    teacher_path, images_path = run_dir / TEACHER_NAME, run_dir / IMAGES_NAME
    if teacher_path.exists() and images_path.exists():
        return load_file(str(teacher_path)), load_file(str(images_path))
    pipeline = models.load_pipeline(cfg.model, device=device)
    initial = method.state_dict() if kind != "lora" else {}
    _, teacher = draw_teacher(method, initial, pipeline.unet, cfg.seed, rc)
    install(pipeline, method_class(cfg.method.name)(method_cfg), kind, teacher)
    resolution = method_cfg.resolution
    images = {
        "train": generate(pipeline, prompt, rc.train_images, resolution, 2 * cfg.seed, rc),
        "heldout": generate(pipeline, prompt, rc.heldout_images, resolution, 2 * cfg.seed + 1, rc),
    }
    del pipeline
    save_tensors(teacher_path, teacher)
    save_tensors(images_path, images)
    return teacher, images


def score(cfg, rc, method_cfg, device, run_dir: Path, trained: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss of the start, the teacher and every snapshot, each in a fresh stock pipeline."""
    kind, prompt = trained["teacher_kind"], trained["prompt"]
    teacher = load_file(str(run_dir / TEACHER_NAME))
    heldout = load_file(str(run_dir / IMAGES_NAME))["heldout"]
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def scores_with(artifact) -> tuple[float, torch.Tensor]:
        pipeline = models.load_pipeline(cfg.model, device=device, dtype=dtype)
        install(pipeline, method_class(cfg.method.name)(method_cfg), kind, artifact)
        return heldout_scores(pipeline, heldout, prompt, cfg.seed, rc)

    steps = curve_steps(trained["fields"]["train_steps"], rc.curve_points)
    initial = load_snapshot(run_dir, 0)
    (loss_initial, pred_initial), (loss_teacher, pred_teacher) = scores_with(initial), scores_with(teacher)
    distance_initial = prediction_distance(pred_initial, pred_teacher)
    points = []
    for step in steps:
        artifact = load_snapshot(run_dir, step)
        loss, pred = (loss_initial, pred_initial) if step == 0 else scores_with(artifact)
        point = {
            "step": step, "loss": loss, "gap_closed": gap_closed(loss, loss_initial, loss_teacher),
            # ||eps_S - eps_T||^2 / ||eps_init - eps_T||^2: 1 at the start, 0 at the teacher
            "prediction_distance": (
                prediction_distance(pred, pred_teacher) / distance_initial if distance_initial > 0 else None
            ),
        }  # fmt: skip
        if kind == "token":
            point.update(token_scores(artifact, initial, teacher))
        points.append(point)
        log.info("recovery step %d: %s", step, point)
    return {
        "recovery_loss_initial": loss_initial,
        "recovery_loss_teacher": loss_teacher,
        "recovery_gap": loss_initial - loss_teacher,
        **curve_fields(points),
    }

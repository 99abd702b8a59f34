"""One recovery run (`mode=recovery`, set by `experiment=recovery`): teacher, teacher-made
images, training with snapshots, known-answer scores. See benchmark/recovery/teacher.py for the idea.

Resumable like a personalization run: the teacher and its images are stored in the run
directory (`teacher.safetensors`, `recovery_images.safetensors`), the curve's snapshots as
they are taken (`snapshots/`), and `trained.json` once training is over, so a rerun skips
what is done; the train loop resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file

from benchmark import data, models
from benchmark.config import config_error, make_method, training_dtype
from benchmark.recovery.fit import (
    TEACHER_TOKEN_KEY,
    JointTeacher,
    TeacherTokenStates,
    bases_dir,
    fit_base,
    fit_key,
    fitted_base,
    install_reference,
)
from benchmark.recovery.teacher import (
    RecoveryConfig,
    apply_error,
    curve_fields,
    curve_steps,
    draw_change,
    gap_closed,
    generate,
    heldout_scores,
    install,
    load_snapshot,
    prediction_distance,
    save_snapshot,
    save_tensors,
    snapshot_path,
    teacher_artifact,
    teacher_kind,
    token_scores,
)
from benchmark.train import CHECKPOINT_NAME, TRAINED_NAME, release_memory, train
from methods.common.atomic import write_json_atomic
from methods.common.base import SCALES_TEACHER, TOKEN_TEACHER, require
from methods.common.conditioning import token_ids
from methods.common.registry import method_class
from methods.common.token_method import load_token

log = logging.getLogger(__name__)
TEACHER_NAME = "teacher.safetensors"
IMAGES_NAME = "recovery_images.safetensors"
CHANGE_NAME = "teacher_change.safetensors"  # the teacher as a change of the base (install_reference)


def recovery_config(cfg) -> RecoveryConfig:
    """cfg.recovery merged into RecoveryConfig; ConfigError naming a bad key or value."""
    try:
        values = OmegaConf.to_container(cfg.get("recovery") or {}, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RecoveryConfig), values))
    except OmegaConfBaseException as e:
        raise config_error(e, "recovery.") from None


def execute(cfg, method_cfg, subject, image_paths, device, run_dir: Path, monitor) -> dict[str, Any]:
    rc = recovery_config(cfg)
    steps = min(method_cfg.steps, cfg.train.max_steps or method_cfg.steps)
    trained_path = run_dir / TRAINED_NAME
    if trained_path.exists():
        trained = json.loads(trained_path.read_text())
    else:
        trained = train_from_teacher(
            cfg, rc, method_cfg, subject, image_paths, device, run_dir, steps, monitor
        )
        write_json_atomic(trained_path, trained)
        (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        release_memory(device)
    return {**trained["fields"], **score(cfg, rc, method_cfg, device, run_dir, trained)}


@dataclass
class Setting:
    """A method set up on its base (fitted or not), with its teacher and images."""

    method: Any
    components: Any
    kind: str
    prompt: str
    teacher: dict[str, torch.Tensor]
    images: dict[str, torch.Tensor]  # "train", "heldout"
    base_key: str | None  # the fitted base in <paths.results>/recovery_bases/ (None: not fitted)
    fit_losses: list[float] | None = None


def prepare(cfg, rc, method_cfg, subject, image_paths, device, run_dir: Path | None = None) -> Setting:
    """The teacher (drawn from the seed), the base (fitted when ``rc.fit_steps > 0``) and the
    images; the method set up on that base. With a run directory, the teacher and images are
    stored there and read back on a rerun."""
    cls = method_class(cfg.method.name)
    method = make_method(cfg, method_cfg)
    kind = teacher_kind(method)
    rc = rc.for_teacher(kind)
    prompt = rc.prompt.format(method.subject_phrase(subject))
    initial_token = start_state(cfg, cls, method_cfg, subject, torch.float32) if kind == TOKEN_TEACHER else {}
    change = draw_change(kind, initial_token, models.load_components(cfg.model).unet, cfg.seed, rc)
    base_key, fit_losses, base = None, None, None
    if rc.fit_steps:
        base_key, fit_losses, base, change = fitted(cfg, rc, cls, method_cfg, subject, image_paths, kind,
                                                    change, initial_token, prompt, device)  # fmt: skip
    if base is not None and TEACHER_TOKEN_KEY in base:  # the joint fit's teacher token
        change = {name: base.pop(TEACHER_TOKEN_KEY) for name in change}
    components = models.load_components(cfg.model, device=device, dtype=training_dtype(method_cfg))
    if base is not None:
        components.unet.load_state_dict(base)
    method.setup(components, subject)
    teacher = teacher_artifact(kind, change, method.state_dict() if kind == SCALES_TEACHER else {})
    if run_dir is not None and not (run_dir / CHANGE_NAME).exists():
        save_tensors(run_dir / CHANGE_NAME, change)
    images = stored_images(run_dir)
    if images is None:
        if rc.fit_steps:  # the subject's real images; held out: fresh (noise, t) draws on them
            subject_images = data.load_images(image_paths, method_cfg.resolution)
            images = {"train": subject_images, "heldout": subject_images.clone()}
            if rc.holdout_images:  # and the last k images, never trained on (the fit saw them)
                images = split_images(subject_images, rc.holdout_images)
        else:
            images = teacher_images(cfg, rc, cls, method_cfg, kind, teacher, prompt, device)
        if run_dir is not None:
            save_tensors(run_dir / TEACHER_NAME, teacher)
            save_tensors(run_dir / IMAGES_NAME, images)
    return Setting(method, components, kind, prompt, teacher, images, base_key, fit_losses)


def split_images(subject_images: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """``recovery.holdout_images=k``: the method trains on all but the last ``k`` subject images
    (held out: fresh draws on those), ``heldout_images`` the last ``k``, scored beside them."""
    require(
        0 < k < len(subject_images),
        f"recovery.holdout_images={k}: the subject has {len(subject_images)} images; "
        f"hold out 1 to {len(subject_images) - 1}",
    )
    train = subject_images[:-k]
    return {"train": train, "heldout": train.clone(), "heldout_images": subject_images[-k:].clone()}


def stored_images(run_dir: Path | None):
    if run_dir is None or not (run_dir / IMAGES_NAME).exists():
        return None
    return load_file(str(run_dir / IMAGES_NAME))


def start_state(cfg, cls, method_cfg, subject, dtype=None) -> dict[str, torch.Tensor]:
    """The method's state right after ``setup`` on the model as it is (token methods: e0), in
    ``dtype`` (None: the method's training dtype). The token teacher is drawn around e0 in fp32
    for every token method: TI, GF-TI and ZOODiP then share one teacher and one fitted base."""
    probe = cls(method_cfg)
    probe.setup(models.load_components(cfg.model, dtype=dtype or training_dtype(method_cfg)), subject)
    return {k: v.detach().cpu().float().clone() for k, v in probe.state_dict().items()}


def teacher_images(cfg, rc, cls, method_cfg, kind, teacher, prompt, device):
    """fit_steps=0: the images the model as it is makes with the teacher in place."""
    pipeline = models.load_pipeline(cfg.model, device=device)
    install(pipeline, cls(method_cfg), kind, teacher)
    resolution = method_cfg.resolution
    return {
        "train": generate(pipeline, prompt, rc.train_images, resolution, 2 * cfg.seed, rc),
        "heldout": generate(pipeline, prompt, rc.heldout_images, resolution, 2 * cfg.seed + 1, rc),
    }


def prompt_states(cfg, method_cfg, kind, token, prompt, device) -> torch.Tensor:
    """P's text states in a stock pipeline, with ``token`` put in unquantized (as TI's apply; the
    same for every token method, so that they share one fitted base)."""
    pipeline = models.load_pipeline(cfg.model, device=device)
    if kind == TOKEN_TEACHER:
        load_token(pipeline, token, method_cfg.placeholder_token)
    with torch.no_grad():
        return pipeline.text_encoder(token_ids(pipeline.tokenizer, [prompt], device))[0]


def fitted(cfg, rc, cls, method_cfg, subject, image_paths, kind, change, initial_token, prompt, device):
    """(cache key, fit losses or None when cached, fitted U-Net state, the teacher's change: fitted
    with W for a weight teacher with ``rc.fit_teacher``, else ``change``): benchmark/recovery/fit.py."""
    resolution = method_cfg.resolution
    subject_images = data.load_images(image_paths, resolution)
    contrast = rc.token_class_images if kind == TOKEN_TEACHER else "same_class"
    if contrast == "inverted":  # C = S in negative: the start token comes to mean "the negative photo"
        class_images = -subject_images
    else:
        class_paths = (other_class_image_paths if contrast == "other_classes" else class_image_paths)(
            image_paths, subject, rc.class_images
        )
        class_images = data.load_images(class_paths, resolution)
    if kind == TOKEN_TEACHER:  # P's states with the teacher's token, and with the token at its start
        states = [prompt_states(cfg, method_cfg, kind, t, prompt, device) for t in (change, initial_token)]
    else:
        states = [prompt_states(cfg, method_cfg, kind, None, prompt, device)] * 2
    weight_joint = rc.fit_teacher and kind != TOKEN_TEACHER
    fit_settings = (rc.fit_steps, rc.fit_lr, rc.fit_batch, cfg.seed, kind)
    if weight_joint:  # (a base fitted with a fixed teacher keeps its old key)
        fit_settings += ("joint", rc.lora_rank, rc.teacher_steps)
    if kind == TOKEN_TEACHER and (rc.token_attention_gain != 1 or rc.token_joint_fit):
        fit_settings += (rc.token_attention_gain, rc.token_joint_fit)
    if kind == TOKEN_TEACHER and rc.token_joint_fit and rc.teacher_steps:
        fit_settings += ("teacher_steps", rc.teacher_steps)
    key = fit_key([OmegaConf.to_container(cfg.model, resolve=True), fit_settings, change, *states,
                   subject_images, class_images])  # fmt: skip
    path = bases_dir(cfg.paths.results) / f"{key}.safetensors"
    teacher_path = path.with_suffix(".teacher.safetensors")  # the jointly fitted weight teacher
    losses, joint = [], kind == TOKEN_TEACHER and rc.token_joint_fit

    def fit():
        components = models.load_components(cfg.model, device=device)
        if kind == TOKEN_TEACHER:
            amplify_cross_attention(components.unet, rc.token_attention_gain)
        weight_change = {} if kind == TOKEN_TEACHER else change
        if weight_joint:
            weight_change = JointTeacher(kind, change, rc.lora_rank, device)
        token_states = joint_token_states(cfg, method_cfg, change, prompt, device) if joint else None
        losses.extend(fit_base(components, kind, weight_change, subject_images.to(device),
                               class_images.to(device), states, rc, cfg.seed, token_states))  # fmt: skip
        log.info("fitted base %s: L_fit %.4f -> %.4f over %d steps", key, losses[0], losses[-1], len(losses))
        if weight_joint:  # written before the base: a base on disk has its teacher
            save_tensors(teacher_path, {k: v.detach().cpu() for k, v in weight_change.current().items()})
        state = {k: v.detach().cpu() for k, v in components.unet.state_dict().items()}
        if joint:
            state[TEACHER_TOKEN_KEY] = token_states.token.detach().cpu()
        return state

    state = fitted_base(path, fit)
    if weight_joint:
        change = load_file(str(teacher_path))
    return key, losses or None, state, change


def joint_token_states(cfg, method_cfg, change, prompt, device) -> TeacherTokenStates:
    """P's text states as a function of the teacher token, from the seeded draw ``change``."""
    pipeline = models.load_pipeline(cfg.model, device=device)
    load_token(pipeline, change, method_cfg.placeholder_token)
    row = pipeline.tokenizer.convert_tokens_to_ids(method_cfg.placeholder_token)
    ids = token_ids(pipeline.tokenizer, [prompt], device)
    return TeacherTokenStates(pipeline.text_encoder, ids, row, next(iter(change.values())))


@torch.no_grad()
def amplify_cross_attention(unet, gain: float) -> None:
    """Multiply every cross-attention output projection (``attn2.to_out.0``) by ``gain``: the
    token fit's start, so that the U-Net reads the text states (random weights barely do)."""
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            module.weight *= gain
            if module.bias is not None:
                module.bias *= gain


def class_image_paths(image_paths, subject, count: int) -> list[Path]:
    """C: up to ``count`` images of the other subjects of ``subject``'s class (all other subjects
    if it has none), taken in turn from each subject so that every one is represented."""
    root = Path(image_paths[0]).parent.parent
    others = [s for s in data.SUBJECTS.values() if s.name != subject.name and (root / s.name).is_dir()]
    same = [s for s in others if s.class_noun == subject.class_noun] or others
    per_subject = [data.subject_image_paths(root, s) for s in same]
    chosen = []
    for i in range(max(map(len, per_subject), default=0)):
        chosen += [paths[i] for paths in per_subject if i < len(paths)]
    return chosen[:count]


def other_class_image_paths(image_paths, subject, count: int) -> list[Path]:
    """C for ``recovery.token_class_images=other_classes``: up to ``count`` images of the subjects
    of the other classes (dog6: the 22 subjects that are no dog), one from each in turn."""
    root = Path(image_paths[0]).parent.parent
    others = [
        s for s in data.SUBJECTS.values() if s.class_noun != subject.class_noun and (root / s.name).is_dir()
    ]
    return in_turn([data.subject_image_paths(root, s) for s in others], count)


def in_turn(per_subject: list[list[Path]], count: int) -> list[Path]:
    chosen = []
    for i in range(max(map(len, per_subject), default=0)):
        chosen += [paths[i] for paths in per_subject if i < len(paths)]
    return chosen[:count]


def train_from_teacher(cfg, rc, method_cfg, subject, image_paths, device, run_dir, steps, monitor):
    setting = prepare(cfg, rc, method_cfg, subject, image_paths, device, run_dir)
    method = setting.method
    method.precompute(setting.images["train"], cfg.seed, steps)
    if not snapshot_path(run_dir, 0).exists():
        save_snapshot(run_dir, 0, method)  # the method's own initialization
    points = set(curve_steps(steps, rc.curve_points))

    def snapshot(done: int) -> None:
        if done in points:
            save_snapshot(run_dir, done, method)

    monitor.loaded(setting.components, method)
    result = train(
        method, setting.images["train"], steps, method_cfg.batch_size, cfg.seed, run_dir, device,
        checkpoint_every=cfg.train.checkpoint_every, log_every=cfg.train.log_every,
        progress=cfg.train.progress, monitor=monitor, after_step=snapshot,
    )  # fmt: skip
    artifact_path = method.save_artifact(run_dir)
    fields = {
        "train_steps": result.steps, "train_seconds": result.seconds, "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from, "artifact_bytes": artifact_path.stat().st_size,
        "trainable_params": sum(t.numel() for t in method.state_dict().values()),
        "forward_passes_per_step": None, **monitor.summary(), **method.record_extras(),
        "teacher_kind": setting.kind, "recovery_prompt": setting.prompt, "recovery_base": setting.base_key,
    }  # fmt: skip
    return {"artifact": artifact_path.name, "teacher_kind": setting.kind, "prompt": setting.prompt,
            "base": setting.base_key, "fields": fields}  # fmt: skip


def base_pipeline(cfg, trained_base: str | None, device, dtype):
    """A stock pipeline with the run's base U-Net: the fitted one, or the model as it is."""
    pipeline = models.load_pipeline(cfg.model, device=device, dtype=dtype)
    if trained_base is not None:
        state = load_file(str(bases_dir(cfg.paths.results) / f"{trained_base}.safetensors"))
        state.pop(TEACHER_TOKEN_KEY, None)  # the joint fit's teacher token: the run's teacher file has it
        pipeline.unet.load_state_dict(state)
    return pipeline


def score(cfg, rc, method_cfg, device, run_dir: Path, trained: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss of the start, the teacher and every snapshot, each in a fresh stock pipeline."""
    kind, prompt = trained["teacher_kind"], trained["prompt"]
    teacher = load_file(str(run_dir / TEACHER_NAME))
    stored = load_file(str(run_dir / IMAGES_NAME))
    heldout, held_images = stored["heldout"], stored.get("heldout_images")
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def scores_with(artifact) -> tuple[float, torch.Tensor]:
        pipeline = base_pipeline(cfg, trained.get("base"), device, dtype)
        install(pipeline, method_class(cfg.method.name)(method_cfg), kind, artifact)
        return heldout_scores(pipeline, heldout, prompt, cfg.seed, rc)

    def image_loss(artifact) -> float:  # on the images never trained on (recovery.holdout_images)
        pipeline = base_pipeline(cfg, trained.get("base"), device, dtype)
        install(pipeline, method_class(cfg.method.name)(method_cfg), kind, artifact)
        return heldout_scores(pipeline, held_images, prompt, cfg.seed, rc)[0]

    steps = curve_steps(trained["fields"]["train_steps"], rc.curve_points)
    initial = load_snapshot(run_dir, 0)
    if held_images is not None:
        image_initial, image_teacher = image_loss(initial), image_loss(teacher)
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
        if kind == TOKEN_TEACHER:
            point.update(token_scores(artifact, initial, teacher))
        if held_images is not None:
            point["image_loss"] = image_initial if step == 0 else image_loss(artifact)
            point["image_gap_closed"] = gap_closed(point["image_loss"], image_initial, image_teacher)
        points.append(point)
        log.info("recovery step %d: %s", step, point)
    fields = {
        "recovery_loss_initial": loss_initial,
        "recovery_loss_teacher": loss_teacher,
        "recovery_gap": loss_initial - loss_teacher,
        **curve_fields(points),
    }
    if held_images is not None:
        fields |= {
            "recovery_heldout_images": len(held_images),
            "recovery_image_loss_initial": image_initial,
            "recovery_image_loss_teacher": image_teacher,
            "recovery_image_gap": image_initial - image_teacher,
        }
    if (run_dir / CHANGE_NAME).exists():  # the method's apply against the teacher put in directly
        placeholder = getattr(method_cfg, "placeholder_token", None)
        start = initial if kind == TOKEN_TEACHER else {}

        def reference_scores(change) -> tuple[float, torch.Tensor]:
            pipeline = base_pipeline(cfg, trained.get("base"), device, dtype)
            if change:
                install_reference(pipeline, kind, change, placeholder)
            return heldout_scores(pipeline, heldout, prompt, cfg.seed, rc)

        (ref_initial, ref_pred_initial) = reference_scores(start)
        (ref_teacher, ref_pred_teacher) = reference_scores(load_file(str(run_dir / CHANGE_NAME)))
        fields |= {
            "recovery_loss_initial_reference": ref_initial,
            "recovery_loss_teacher_reference": ref_teacher,
            "recovery_gap_reference": ref_initial - ref_teacher,
            "recovery_apply_error": apply_error(
                pred_teacher - pred_initial, ref_pred_teacher - ref_pred_initial
            ),
        }
    return fields

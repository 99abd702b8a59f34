"""Typed schemas of the run configuration, and ``validate``: every bad input fails here, with one
line naming the value and what is allowed, before any model is loaded.

The composed Hydra config is merged into :class:`RunSchema` (OmegaConf structured config): an
unknown key or a value of the wrong type is refused by OmegaConf, each section's
``__post_init__`` checks its ranges, and ``cfg.method`` goes through the method's own
``Config`` dataclass (``benchmark.config.method_config``). ``validate`` then checks what needs
the disk: the subject's images, the metric weights and the placeholder token against the
model's tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from benchmark import data, datasets, models
from benchmark.config import config_error, resolve_device, typed_method, typed_object
from benchmark.metrics import MetricModelsUnavailable
from benchmark.models.families import FAMILIES
from methods.common.base import ConfigError, MethodConfig, require
from methods.common.errors import ConfigErrors, every_problem, problem_messages
from methods.common.registry import method_class
from methods.common.savers import Savers, check_savers

MODES = ("personalize", "real", "recovery")  # recovery: experiment=recovery (benchmark/recovery/teacher.py)
MODEL_KINDS = ("hub", "tiny", "arch")
DIFFUSERS_FOLDER = ("model_index.json", "tokenizer", "text_encoder", "vae", "unet", "scheduler")
CLIP_SOURCES = ("open_clip", "random")
DINO_SOURCES = ("timm", "random")
# Bad input: the user fixes it (a value, a path, a download); a run never records it.
INPUT_ERRORS = (ConfigError, data.DatasetUnavailable, models.WeightsUnavailable, MetricModelsUnavailable)


def _is_null_or_at_least_1(value: int | None) -> bool:
    return value is None or value >= 1


def _require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    require(value in choices, f"{key}={value!r}; choose one of: {', '.join(choices)}")


@dataclass
class DataSchema:
    root: str | None = None
    download: bool = True
    cache_dir: str = MISSING
    dataset: str = datasets.DREAMBOOTH  # the reader of data.root (benchmark.datasets.DATASETS)
    class_noun: str | None = None  # your own subject under dataset=dreambooth: its class noun
    subject_type: str | None = None  # ... and live | object (which evaluation prompt list)
    # checked with the subject (checked_subject): one line for a bad dataset, subject or class


@dataclass
class PathsSchema:
    results: str = "results"


@dataclass
class TrainSchema:
    max_steps: int | None = None
    checkpoint_every: int = 500
    log_every: int = 50
    progress: bool = True
    step_delay_s: float = 0.0
    profile_steps: int = 1
    allow_tf32: bool = False
    # the memory savers of the diffusers examples (methods.common.savers)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    set_grads_to_none: bool = True
    foreach: bool | None = None

    def __post_init__(self) -> None:
        self.savers()  # checks mixed_precision
        require(
            _is_null_or_at_least_1(self.max_steps),
            f"train.max_steps={self.max_steps} must be >= 1, or null for the method's own step count",
        )
        require(
            self.checkpoint_every >= 0,
            f"train.checkpoint_every={self.checkpoint_every} must be >= 0 (0: never)",
        )
        require(self.log_every >= 0, f"train.log_every={self.log_every} must be >= 0 (0: never)")
        require(self.step_delay_s >= 0, f"train.step_delay_s={self.step_delay_s} must be >= 0 (seconds)")
        require(self.profile_steps >= 0, f"train.profile_steps={self.profile_steps} must be >= 0 (0: off)")

    def savers(self) -> Savers:
        return Savers(self.mixed_precision, self.gradient_checkpointing, self.set_grads_to_none, self.foreach)


@dataclass
class ModelSchema:
    name: str = MISSING
    kind: str = MISSING
    family: str = "sd1"  # sd1 | sd2 | sdxl (benchmark/models/families.py)
    # per text encoder: the CLIP whose text tower it is (hub id, folder, or "random"; GF-TI's init)
    text_encoder_clip: list[str] | None = None
    resolution: int = 512
    num_train_timesteps: int = 1000
    max_train_steps: int | None = None
    init_seed: int = 0  # tiny, arch
    hub_id: str | None = None  # hub
    path: str | None = None  # hub: a local diffusers folder, wins over hub_id
    revision: str | None = None  # hub
    unet: dict[str, Any] | None = None  # tiny: overrides of benchmark.models.TINY_*
    vae: dict[str, Any] | None = None
    text_encoder: dict[str, Any] | None = None
    text_encoder_2: dict[str, Any] | None = None  # tiny sdxl
    vae_posterior_logvar: float | None = None  # tiny, arch: benchmark.models.set_posterior_logvar
    # a paper's per-model hyper-parameters, {method: {key: value}}: conf/method/*.yaml interpolate them
    method_defaults: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _require_choice("model.kind", self.kind, MODEL_KINDS)
        _require_choice("model.family", self.family, FAMILIES)
        require(
            self.resolution >= 8 and self.resolution % 8 == 0,
            f"model.resolution={self.resolution} must be a positive multiple of 8 (the VAE downsamples 8x)",
        )
        require(
            self.num_train_timesteps >= 1,
            f"model.num_train_timesteps={self.num_train_timesteps} must be >= 1",
        )
        require(
            _is_null_or_at_least_1(self.max_train_steps),
            f"model.max_train_steps={self.max_train_steps} must be >= 1, or null (no cap)",
        )
        if self.kind == "hub":
            require(bool(self.path or self.hub_id), "model.kind=hub needs model.hub_id or model.path")
            if self.path:
                check_diffusers_folder(self.path)


def check_diffusers_folder(path: str) -> None:
    folder = Path(path).expanduser()
    missing = [name for name in DIFFUSERS_FOLDER if not (folder / name).exists()]
    require(
        not missing,
        f"model.path={path!r} is not a diffusers Stable Diffusion folder (missing {', '.join(missing)}); "
        "pass the folder that holds model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/",
    )


@dataclass
class DinoInterSchema:
    images: int = 50
    prompt_index: int = 0


@dataclass
class ClipSchema:
    source: str = MISSING
    arch: str = MISSING
    pretrained: str | None = None
    checkpoint: str | None = None
    seed: int = 0  # random
    model_cfg: dict[str, Any] | None = None  # random

    def __post_init__(self) -> None:
        _require_choice("eval.clip.source", self.source, CLIP_SOURCES)


@dataclass
class DinoSchema:
    source: str = MISSING
    arch: str = MISSING
    checkpoint: str | None = None
    image_size: int = 224
    seed: int = 0  # random
    model_kwargs: dict[str, Any] | None = None  # random

    def __post_init__(self) -> None:
        _require_choice("eval.dino.source", self.source, DINO_SOURCES)
        require(self.image_size >= 1, f"eval.dino.image_size={self.image_size} must be >= 1")


@dataclass
class EvalSchema:
    name: str = MISSING
    images_per_prompt: int = MISSING
    num_prompts: int = MISSING
    num_inference_steps: int = MISSING
    guidance_scale: float = MISSING
    batch_size: int = MISSING
    drop_class_noun_for_token_methods: bool = MISSING
    dino_inter: DinoInterSchema = MISSING
    clip: ClipSchema = MISSING
    dino: DinoSchema = MISSING

    def __post_init__(self) -> None:
        n_prompts = len(data.OBJECT_PROMPTS)
        require(self.images_per_prompt >= 1, f"eval.images_per_prompt={self.images_per_prompt} must be >= 1")
        require(
            1 <= self.num_prompts <= n_prompts,
            f"eval.num_prompts={self.num_prompts} must be in 1..{n_prompts}",
        )
        require(
            self.num_inference_steps >= 1, f"eval.num_inference_steps={self.num_inference_steps} must be >= 1"
        )
        require(
            math.isfinite(self.guidance_scale) and self.guidance_scale >= 0,
            f"eval.guidance_scale={self.guidance_scale} must be a finite number >= 0",
        )
        require(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be >= 1")
        require(
            self.dino_inter.images >= 2,
            f"eval.dino_inter.images={self.dino_inter.images} must be >= 2 (DINO-inter compares pairs)",
        )
        require(  # checked against a valid num_prompts only: a bad one is named above
            not 1 <= self.num_prompts <= n_prompts or 0 <= self.dino_inter.prompt_index < self.num_prompts,
            f"eval.dino_inter.prompt_index={self.dino_inter.prompt_index} must be in "
            f"0..{self.num_prompts - 1} (eval.num_prompts={self.num_prompts})",
        )


@dataclass
class RunScalars:
    """The top-level values of a run config (its sections are checked by their own schemas)."""

    mode: str = "personalize"
    subject: str = "dog6"
    seed: int = 0
    device: str = "auto"
    skip_done: bool = True

    def __post_init__(self) -> None:
        _require_choice("mode", self.mode, MODES)
        require(self.seed >= 0, f"seed={self.seed} must be >= 0")


@dataclass
class RunSchema(RunScalars):
    data: DataSchema = MISSING
    paths: PathsSchema = MISSING
    train: TrainSchema = MISSING
    model: ModelSchema = MISSING
    eval: EvalSchema = MISSING
    method: Any = None  # checked against the method's own Config dataclass (benchmark.config.method_config)
    report: Any = None  # an experiment's table layout (conf/experiment/*.yaml): read by the report, not a run
    recovery: Any = None  # mode=recovery: checked against benchmark.recovery.teacher.RecoveryConfig


SECTIONS = {
    "data": DataSchema,
    "paths": PathsSchema,
    "train": TrainSchema,
    "model": ModelSchema,
    "eval": EvalSchema,
}
NOT_SCALARS = (*SECTIONS, "method", "report", "recovery")


@dataclass
class ValidRun:
    """What ``validate`` established: everything ``benchmark.run`` needs before loading a model."""

    cfg: RunSchema
    method: MethodConfig | None  # None in mode=real
    subject: data.Subject
    device: Any  # torch.device
    image_paths: list[Path] = field(default_factory=list)


def resolved(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The config as plain Python, interpolations resolved (a plain dict is returned as it is)."""
    if isinstance(cfg, dict):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise config_error(e) from None


def typed_config(cfg: DictConfig | dict[str, Any]) -> RunSchema:
    """``cfg`` merged into :class:`RunSchema`; ConfigErrors naming every bad value."""
    return typed_object(RunSchema, resolved(cfg))


def typed_scalars(scalars: dict[str, Any]) -> RunScalars:
    """The top-level values as RunScalars: directly when every value has its field's type (a
    sweep's thousand jobs), through OmegaConf otherwise (its conversions and messages)."""
    types = {f.name: f.type for f in fields(RunScalars)}  # strings: `from __future__ import annotations`
    exact = all(k in types and type(v).__name__ == types[k] for k, v in scalars.items())
    if exact:
        return every_problem(lambda: RunScalars(**scalars))
    return typed_object(RunScalars, scalars)


REAL_SIZE_KINDS = ("hub", "arch")  # real weights, or the real architecture with random weights


def run_device(run_cfg: RunSchema):
    """The torch.device the run uses. device=auto on a machine without CUDA is refused for a
    real-size model that trains (hub weights or an *_arch model): it would train on the CPU for
    days. device=cpu says that is meant."""
    device = resolve_device(run_cfg.device)
    trains = run_cfg.mode in ("personalize", "recovery")
    if run_cfg.device == "auto" and device.type == "cpu" and trains and run_cfg.model.kind in REAL_SIZE_KINDS:
        raise ConfigError(
            f"device=auto found no CUDA device, and model={run_cfg.model.name} (kind {run_cfg.model.kind}: "
            "real size) would train on the CPU for days; run where a GPU is visible, or pass device=cpu "
            "to train on the CPU anyway"
        )
    return device


def check_results_writable(results: str) -> None:
    """``paths.results`` is, or can be made, a folder this process writes into (nothing is created)."""
    path = Path(results).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    require(
        existing.is_dir() and os.access(existing, os.W_OK | os.X_OK),
        f"paths.results={results!r} cannot be written ({existing} is "
        f"{'not writable' if existing.is_dir() else 'not a folder'}); pass paths.results=<a writable folder>",
    )


class DiskChecks:
    """The checks that read the disk or ask the network, each done once per distinct input: a
    700-run sweep checks its 30 subjects' images once each."""

    def __init__(self) -> None:
        self.done: dict[tuple, tuple[Any, Exception | None]] = {}

    def once(self, key: tuple, check, *args) -> Any:
        if key not in self.done:
            try:
                self.done[key] = (check(*args), None)
            except INPUT_ERRORS as e:
                self.done[key] = (None, e)
        result, error = self.done[key]
        if error is not None:
            raise error
        return result


def checked_subject(values: dict[str, Any]) -> data.Subject:
    """The run's subject as its dataset describes it (``values``: the resolved config, its
    sections not yet typed); ConfigError, one line, where it cannot be."""
    try:
        subject = datasets.subject_for(values.get("data") or {}, str(values.get("subject")))
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from None
    n_prompts = (values.get("eval") or {}).get("num_prompts")
    require(
        not isinstance(n_prompts, int) or len(subject.prompt_templates) >= n_prompts,
        f"subject={subject.name!r} has {len(subject.prompt_templates)} prompts, fewer than "
        f"eval.num_prompts={n_prompts}; pass eval.num_prompts={len(subject.prompt_templates)} or add prompts",
    )
    return subject


def subject_images(data_cfg: DataSchema, subject: data.Subject) -> list[Path]:
    """The subject's image files, every one decoded; ConfigError naming the folder or the file."""
    root = data.resolve_dataset_root(data_cfg.root, data_cfg.download, data_cfg.cache_dir)
    try:
        return data.subject_image_paths(root, subject)
    except ValueError as e:  # no images, or an unreadable one: the message names the folder or file
        raise ConfigError(str(e)) from None


class Checker:
    """Runs the checks of a run config in order. ``collect=False`` (``validate``): raise the first
    problem. ``collect=True`` (a sweep): note every problem, one line each, and carry on."""

    def __init__(
        self, collect: bool, disk: DiskChecks | None = None, check_device: bool = True, inputs: bool = True
    ):
        self.collect, self.disk, self.check_device = collect, disk or DiskChecks(), check_device
        self.inputs = inputs  # False: the values alone, not the images, weights and tokenizer
        self.found: list[str] = []

    def attempt(self, check, *args) -> Any:
        try:
            return check(*args)
        except INPUT_ERRORS as e:
            if not self.collect:  # validate: the first bad value, as a plain ConfigError
                if isinstance(e, ConfigErrors):
                    raise ConfigError(e.messages[0]) from None
                raise
            self.found += [m for m in problem_messages(e) if m not in self.found]
            return None

    def sections(self, values: dict[str, Any]) -> RunSchema:
        """The sections typed, merged once per distinct value: the jobs of a sweep differ mostly
        in subject and seed, and a merge into the schema costs milliseconds."""
        shared = {k: v for k, v in values.items() if k in NOT_SCALARS}
        key = ("typed", json.dumps(shared, sort_keys=True, default=str))
        return self.disk.once(key, typed_object, RunSchema, shared)

    def method_config(self, values: dict[str, Any]) -> MethodConfig:
        key = ("method", json.dumps(values["method"], sort_keys=True, default=str))
        return self.disk.once(key, typed_method, values["method"])

    def run(self, cfg: DictConfig | dict[str, Any]) -> ValidRun | None:
        values = self.attempt(resolved, cfg)
        if values is None:
            return None
        sections = self.attempt(self.sections, values)
        scalars = self.attempt(typed_scalars, {k: v for k, v in values.items() if k not in NOT_SCALARS})
        which = json.dumps([values.get("subject"), values.get("data"), values.get("eval")], default=str)
        subject = self.attempt(self.disk.once, ("subject", which), checked_subject, values)
        trains = values.get("mode") in ("personalize", "recovery")
        method_cfg = self.attempt(self.method_config, values) if trains else None
        if values.get("mode") == "recovery":
            from benchmark.recovery.run import recovery_config

            self.attempt(recovery_config, OmegaConf.create({"recovery": values.get("recovery")}))
        if method_cfg is not None and sections is not None:
            self.attempt(check_method_against_model, method_cfg, sections.model)
        if sections is None or scalars is None:
            return None
        top = {f.name: getattr(scalars, f.name) for f in fields(RunScalars)}
        run_cfg = dataclasses.replace(sections, **top)
        device = self.attempt(run_device, run_cfg) if self.check_device else None
        if method_cfg is not None:
            cls = method_class(method_cfg.name)
            self.attempt(check_savers, cls, method_cfg, run_cfg.train.savers(), device)
        self.attempt(check_results_writable, run_cfg.paths.results)
        if subject is None:
            return None
        if not self.inputs:
            return None if self.found else ValidRun(run_cfg, method_cfg, subject, device)
        model, eval_ = values["model"], values["eval"]
        if run_cfg.mode != "real" and run_cfg.model.kind == "hub":  # weights first: the big download
            key = ("weights", json.dumps(model, sort_keys=True, default=str))
            self.attempt(self.disk.once, key, lambda: models.locate_weights(OmegaConf.create(model)))
        if run_cfg.mode != "recovery":  # recovery scores by denoising loss: no CLIP/DINO weights
            for metric in ("clip", "dino"):  # each missing set its own line
                key = (f"{metric} weights", json.dumps(eval_, sort_keys=True, default=str))
                self.attempt(self.disk.once, key, check_metric_weights, OmegaConf.create(eval_), metric)
        image_paths = None
        if run_cfg.data.root is not None or not self.found:  # no dataset download for a doomed run
            key = ("images", str(run_cfg.data), subject.name)
            image_paths = self.attempt(self.disk.once, key, subject_images, run_cfg.data, subject)
        if method_cfg is not None and hasattr(method_cfg, "placeholder_token"):
            key = ("token", method_cfg.placeholder_token, json.dumps(model, sort_keys=True, default=str))
            self.attempt(
                self.disk.once, key, check_placeholder_token, method_cfg.placeholder_token, run_cfg.model
            )
        if method_cfg is not None and getattr(method_cfg, "init", None) == "cross_attention":
            for source in method_cfg.init_clip:  # GF-TI's init CLIP: a one-line error without it
                self.attempt(self.disk.once, ("clip", source), models.locate_clip, source)
        if self.found:
            return None
        return ValidRun(run_cfg, method_cfg, subject, device, image_paths or [])


def validate(cfg: DictConfig | dict[str, Any]) -> ValidRun:
    """Check the whole run configuration and its inputs on disk; raise ConfigError (or
    DatasetUnavailable / WeightsUnavailable / MetricModelsUnavailable) naming the first bad value.
    Loads no model."""
    return Checker(collect=False).run(cfg)


def problems(
    cfg: DictConfig | dict[str, Any],
    disk: DiskChecks | None = None,
    check_device: bool = True,
    inputs: bool = True,
) -> list[str]:
    """Every bad value of a run config, one line each (empty: the run can start)."""
    checker = Checker(collect=True, disk=disk, check_device=check_device, inputs=inputs)
    checker.run(cfg)
    return checker.found


def check_metric_weights(eval_cfg, metric: str) -> None:
    from benchmark.metrics import check_weights_available

    check_weights_available(eval_cfg, metric)


def check_method_against_model(method_cfg: MethodConfig, model: ModelSchema) -> None:
    """Rules that need both sections: the timestep window lies inside the model's schedule; GF-TI's
    init CLIPs are one per text encoder."""
    if getattr(method_cfg, "init", None) == "cross_attention":
        encoders = 2 if model.family == "sdxl" else 1
        require(
            len(method_cfg.init_clip) == encoders,
            f"method.init_clip={list(method_cfg.init_clip)} names {len(method_cfg.init_clip)} CLIP models; "
            f"model.family={model.family} has {encoders} text encoder(s): give one per encoder",
        )
    if hasattr(method_cfg, "T_L") and hasattr(method_cfg, "T_U"):
        T = model.num_train_timesteps
        require(
            0 <= method_cfg.T_L < method_cfg.T_U <= T,
            f"method.T_L={method_cfg.T_L}, method.T_U={method_cfg.T_U}: need 0 <= T_L < T_U <= {T} "
            f"(model.num_train_timesteps)",
        )


def check_placeholder_token(token: str, model: ModelSchema) -> None:
    """A token method's new token must be new: an existing word would train (and overwrite) it."""
    tokenizer = model_tokenizer(model)
    if token in tokenizer.get_vocab() or len(tokenizer.encode(token, add_special_tokens=False)) == 1:
        raise ConfigError(
            f"method.placeholder_token={token!r} is already in the tokenizer's vocabulary; "
            "pass a new one, e.g. method.placeholder_token='<my-subject>'"
        )


def model_tokenizer(model: ModelSchema):
    """The model's tokenizer, without loading the model, to read only: its own files when they
    are on disk, otherwise CLIP's BPE tokenizer rebuilt offline (every SD 1.x/2.x model's)."""
    from transformers import CLIPTokenizer

    from benchmark.models.tokenizer import shared_clip_tokenizer

    if model.kind == "hub":
        source = str(Path(model.path).expanduser()) if model.path else model.hub_id
        try:
            return CLIPTokenizer.from_pretrained(
                source, subfolder="tokenizer", revision=model.revision, local_files_only=True
            )
        except (OSError, ValueError):  # not cached: loading the model will fetch or explain
            pass
    return shared_clip_tokenizer()

"""Typed, validated run configuration: the method's dataclass schema, device, dtype, run key.

Light on imports (torch only when a device or dtype is asked for): planning and validating a sweep
must not wait for the libraries a run needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from benchmark.datasets import DREAMBOOTH
from methods.common.errors import ConfigError, ConfigErrors, every_problem
from methods.common.registry import method_class

if TYPE_CHECKING:
    from methods.common.base import MethodConfig

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LOCK_NAME = ".lock"  # held (flock) by the process running the run directory
# Keys that say where things live, or how a run is displayed, not what it computes. Where the
# images are (data.root) is not in the key either: the run key ends with the image set's
# fingerprint (benchmark.image_set), so the same photos in another folder are the same run.
NOT_IN_RUN_KEY = (
    "paths", "data.root", "data.download", "data.cache_dir", "skip_done", "device",
    "train.progress", "train.log_every", "train.checkpoint_every", "train.step_delay_s",
    "train.profile_steps",
    "method.class_images_dir",  # DreamBooth's class-image cache: a location
    "report",  # how an experiment's table is drawn (conf/experiment/*.yaml), not what a run computes
    "method.cache_dir",  # Hollowed Net's activation cache: a location
    # how many images generation and scoring batch: memory, not results (each image has its own
    # seeded generator), so a run may be evaluated again with a smaller batch without training again
    "eval.batch_size",
)  # fmt: skip


def method_config(cfg: DictConfig) -> MethodConfig:
    """cfg.method merged into the method's dataclass schema; __post_init__ validates it."""
    return typed_method(OmegaConf.to_container(cfg.method, resolve=True))


def typed_method(values: dict[str, Any]) -> MethodConfig:
    """A method section (plain, resolved) as the method's Config; ConfigErrors lists every bad value."""
    return typed_object(method_class(values["name"]).Config, values, "method.")


def typed_object(schema: type, values: dict[str, Any], prefix: str = "") -> Any:
    """``values`` (plain, resolved) merged into the dataclass ``schema``, its ``__post_init__``
    checks run. Every bad value is named, one message each (ConfigErrors): each unknown key or
    wrong type, then the range checks over the values that remain."""
    try:
        return every_problem(_to_object, schema, values)
    except OmegaConfBaseException as e:
        first = config_error(e, prefix)  # a wrong type, an unknown key: OmegaConf names the first
    bad: list[str] = []
    good: dict[str, Any] = {}
    for key, value in leaves(values).items():
        one = nested({key: value})
        try:
            OmegaConf.merge(OmegaConf.structured(schema), one)
        except OmegaConfBaseException as e:
            bad.append(str(config_error(e, prefix)))
            continue
        good[key] = value
    try:
        every_problem(_to_object, schema, nested(good))
    except ConfigErrors as e:
        bad += e.messages
    except (ConfigError, OmegaConfBaseException):
        pass  # the ranges cannot be checked without the values refused above
    raise ConfigErrors(bad) if bad else first


def _to_object(schema: type, values: dict[str, Any]) -> Any:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))


def leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty dict, like a list, is a leaf."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict) and v:
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def nested(flat_values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`leaves`."""
    out: dict[str, Any] = {}
    for key, value in flat_values.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def config_error(e: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    """OmegaConf's complaint (unknown key, wrong type) as one line naming the key and the value."""
    message = (e.msg or str(e)).splitlines()[0]
    schema = getattr(e, "object_type", None)
    if message.startswith("Key '") and dataclasses.is_dataclass(schema):
        message = f"unknown key; allowed here: {', '.join(f.name for f in dataclasses.fields(schema))}"
    return ConfigError(f"{prefix}{e.full_key or ''}: {message}")


def resolve_device(name: str):
    """The torch.device ``name`` stands for; ConfigError if it does not exist here."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r}; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
    return device


def make_method(cfg: DictConfig, method_cfg: MethodConfig | None = None):
    """The run's method: its typed config (``method_config(cfg)`` unless given) and the memory
    savers of ``cfg.train`` (methods.common.savers), refused in one line where they do not apply."""
    from methods.common.savers import Savers, check_savers

    method_cfg = method_config(cfg) if method_cfg is None else method_cfg
    train = cfg.get("train") or {}
    savers = Savers(**{f.name: train[f.name] for f in dataclasses.fields(Savers) if f.name in train})
    cls = method_class(method_cfg.name)
    check_savers(cls, method_cfg, savers)
    return cls(method_cfg, savers)


def training_dtype(method_cfg: MethodConfig):
    """The dtype the model is loaded in for training: the method's ``load_precision`` where it
    has one (ZOODiP's official protocol casts the networks itself), else its ``precision``."""
    import torch

    name = getattr(method_cfg, "load_precision", None) or getattr(method_cfg, "precision", "fp32")
    return getattr(torch, DTYPE_NAMES[name])


def flat(container: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in container.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def not_in_run_key(key: str) -> bool:
    """A flat key (``method.lr``) that says where things live or how they are shown."""
    return any(key == d or key.startswith(d + ".") for d in NOT_IN_RUN_KEY)


def run_key(cfg: DictConfig | dict[str, Any]) -> str:
    """Stable key from the resolved config minus paths, then the subject's image set: the same run
    always lands in the same dir. ``seed<seed>-<config digest>-<image fingerprint>``; the image
    part is ``NO_IMAGES`` where the subject's folder has no images (yet)."""
    values = plain(cfg)
    return run_key_prefix(values) + (images_fingerprint(values) or NO_IMAGES)


NO_IMAGES = "noimages"


def run_key_prefix(cfg: DictConfig | dict[str, Any]) -> str:
    """The run key up to its image fingerprint: the runs of one configuration on any image set."""
    values = plain(cfg)
    return f"seed{values['seed']}-{config_digest(values)}-"


def located(run_dir: Path) -> Path:
    """``run_dir`` itself; or, where its image set is unknown (``NO_IMAGES``: a status query or a
    report not given the sweep's data.root), the newest run of the same configuration on
    whichever image set it used."""
    if run_dir.exists() or not run_dir.name.endswith("-" + NO_IMAGES):
        return run_dir
    prefix = run_dir.name[: -len(NO_IMAGES)]
    started = [d for d in run_dir.parent.glob(prefix + "*") if d.is_dir() and d.name != run_dir.name]
    return max(started, key=lambda d: d.stat().st_mtime_ns, default=run_dir)


# The run key before it named the photos: data.root (resolved) stood for them, and the
# evaluation settings were all in it. Runs made then are found under their new name.
EARLIER_NOT_IN_RUN_KEY = (
    "paths", "data.download", "data.cache_dir", "skip_done", "device",
    "train.progress", "train.log_every", "train.checkpoint_every", "train.step_delay_s",
    "train.profile_steps", "method.class_images_dir", "report", "method.cache_dir",
    # keys that came with the current key; their defaults are what those runs did
    "data.dataset", "data.class_noun", "data.subject_type", "model.method_defaults", "train.allow_tf32",
)  # fmt: skip


def earlier_run_dir(cfg: DictConfig | dict[str, Any]) -> Path | None:
    """Where the run of ``cfg`` lived under the earlier key (None for mode=real)."""
    values = plain(cfg)
    if values.get("mode") == "real":
        return None
    kept = {
        k: v
        for k, v in flat(values).items()
        if not any(k == d or k.startswith(d + ".") for d in EARLIER_NOT_IN_RUN_KEY)
        and not (k in SETTING_KEY_DEFAULTS and v == SETTING_KEY_DEFAULTS[k])  # keys that came later
    }
    if kept.get("data.root") is not None:
        kept["data.root"] = str(Path(kept["data.root"]).expanduser().resolve())
    digest = hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]
    folder = Path(values["paths"]["results"]) / "runs" / values["method"]["name"] / values["subject"]
    return folder / f"seed{values['seed']}-{digest}"


def dataset_root(values: dict[str, Any]) -> Path:
    """The folder of subject folders a run reads: data.root, or the fetched copy in data.cache_dir."""
    data = values.get("data") or {}
    if data.get("root") is not None:
        return Path(str(data["root"])).expanduser()
    return Path(str(data.get("cache_dir", "."))).expanduser() / "dataset"


def subject_folder(values: dict[str, Any]) -> tuple[Path, tuple[str, ...] | None]:
    """The folder of the subject's photos, and which files in it (None: all), as its dataset says."""
    from benchmark.datasets import subject_entry

    entry = subject_entry(values)
    if entry is None:
        return dataset_root(values) / str(values["subject"]), None
    files = tuple(entry["files"]) if entry["files"] is not None else None
    return dataset_root(values) / entry["folder"], files


def images_fingerprint(values: dict[str, Any]) -> str | None:
    from benchmark.image_set import fingerprint

    return fingerprint(*subject_folder(values))


def plain(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The config resolved to plain Python (a plain dict, as planning a sweep makes, as it is).
    A config composed with its Hydra section keeps it out: it is Hydra's, not the run's, and
    parts of it (hydra.job.num) exist only inside a running job."""
    if isinstance(cfg, dict):
        return cfg
    return {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k != "hydra"
    }


# data.* keys in the run key only where they differ from these defaults: the runs on DreamBooth's
# subjects keep the keys they had before there were other datasets and subjects of your own
DATA_KEY_DEFAULTS = {"data.dataset": DREAMBOOTH, "data.class_noun": None, "data.subject_type": None}
# method.* and train.* keys in the run key only where they differ from these: options that change
# how a result is computed, not the result (PEQA/TuneQDM's layer_impl: the same loss and gradients),
# and the memory savers at the papers' settings (methods.common.savers), so that a run keeps its key
# whichever of these keys its config spells out; a saver turned on is in the key
SETTING_KEY_DEFAULTS = {
    "method.layer_impl": "recompute",
    "method.optimizer": "adamw",
    "method.train_text_encoder": False,
    "train.mixed_precision": "no",
    "train.gradient_checkpointing": False,
    "train.set_grads_to_none": True,
    "train.foreach": None,
}


def config_digest(cfg: DictConfig | dict[str, Any]) -> str:
    from benchmark.datasets import subject_entry

    values = plain(cfg)
    entry = subject_entry(values) if "data" in values else None
    values = flat(values) | ({"subject_entry": entry} if entry is not None else {})
    kept = {
        k: v
        for k, v in values.items()
        if not not_in_run_key(k)
        and not (k in DATA_KEY_DEFAULTS and v == DATA_KEY_DEFAULTS[k])
        and not (k in SETTING_KEY_DEFAULTS and v == SETTING_KEY_DEFAULTS[k])
    }
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_dir_for(cfg: DictConfig | dict[str, Any]) -> Path:
    values = plain(cfg)
    if values.get("mode") == "real":
        return real_run_dir(values)
    method, subject = values["method"]["name"], values["subject"]
    return Path(values["paths"]["results"]) / "runs" / method / subject / run_key(values)


def real_run_dir(cfg: DictConfig | dict[str, Any]) -> Path:
    """mode=real scores the subject's images against each other: nothing random, no method, no
    model, so the key is the subject, the evaluation protocol and the image set (no seed)."""
    values = plain(cfg)
    key = config_digest({"subject": values["subject"], "eval": values["eval"]})
    images = images_fingerprint(values) or NO_IMAGES
    return Path(values["paths"]["results"]) / "runs" / "real" / values["subject"] / f"real-{key}-{images}"

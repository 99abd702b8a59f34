"""Each job of a sweep as a plain, resolved config, its config files composed once.

Hydra composes a job as (the config files its group overrides choose) + (its value overrides
applied on top), and a run resolves the interpolations. Jobs of a sweep differ mostly in
subject and seed, and composing and resolving each from scratch costs tens of milliseconds,
most of it in OmegaConf's interpolation grammar and deep copies. :class:`JobComposer` composes
and resolves each choice of files once; a value override that no interpolation can read is set
on a copy of the resolved dict. Any other override (one an interpolation reads, one that adds or
deletes a key or sets a whole node, a value that is itself an interpolation) goes through Hydra's
own override step, exactly as a run applies it (tests/sweep/test_sweep.py compares the two).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException)  # what Hydra raises on a bad override
REFERENCE = re.compile(r"\$\{(\.*)([\w-]+(?:\.[\w-]+)*)\}")  # ${model.resolution}, ${.high_resolution}
RESOLVER_CALL = re.compile(r"\$\{([\w.]+):")  # ${oc.env:HOME}
NODE_FREE_RESOLVERS = ("oc.env", "now")  # resolvers that read no config node
SELECT = re.compile(r"\$\{oc\.select:([\w-]+(?:\.[\w-]+)*)\s*[,}]")  # reads the one absolute path it names
SCALARS = (str, int, float, bool, type(None))


class ComposeFailed(ValueError):
    """Hydra refused a job's overrides; the message is Hydra's complaint on one line."""


@contextlib.contextmanager
def hydra_context() -> Iterator[None]:
    """Compose with conf/ (or, inside a running Hydra app, with the app's own config)."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield


def is_group_override(override: Override) -> bool:
    """`method=ti`, `+experiment/table2=x`, `hydra/launcher=slurm`: choose a config file (the
    defaults list consumes them); anything else sets a value."""
    key = override.key_or_group
    return override.package is not None or key.startswith("hydra") or (CONF_DIR / key).is_dir()


def hydra_message(error: BaseException) -> str:
    """Hydra's or OmegaConf's complaint on one line, its list of options kept."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = lines[: lines.index("Config search path:")] if "Config search path:" in lines else lines
    head = lines[0].removeprefix("In 'config': ")
    if len(lines) > 1 and lines[1].startswith("Available options"):
        return f"{head}; choose one of: {', '.join(lines[2:])}"
    cause = error.__cause__
    because = f" ({str(cause).splitlines()[0]})" if isinstance(cause, OmegaConfBaseException) else ""
    return " ".join([head, *lines[1:]]) + because


@dataclass
class ComposedFiles:
    """One choice of config files, composed (``cfg``) and resolved (``values``), and what its
    interpolations read: absolute node paths, and the names read relative to a node."""

    cfg: DictConfig
    values: dict[str, Any]
    read_paths: set[str] = field(default_factory=set)
    read_names: set[str] = field(default_factory=set)
    reads_any_node: bool = False  # a resolver that may read any node (oc.select, a custom one)

    @classmethod
    def of(cls, cfg: DictConfig) -> ComposedFiles:
        files = cls(cfg, OmegaConf.to_container(cfg, resolve=True))
        for text in strings(OmegaConf.to_container(cfg, resolve=False)):
            if "${" not in text:
                continue
            selected = SELECT.findall(text)
            files.read_paths.update(selected)
            calls = RESOLVER_CALL.findall(text)
            any_node = [r for r in calls if r not in NODE_FREE_RESOLVERS]
            files.reads_any_node |= len(any_node) > len(selected)  # oc.select of a named path is not "any"
            for dots, path in REFERENCE.findall(text):
                if dots:  # relative to the node that holds the string: ${.high_resolution}
                    files.read_names.add(path.split(".")[0])
                else:
                    files.read_paths.add(path)
        return files

    def is_read(self, key: str) -> bool:
        """Whether an interpolation may read ``key`` (itself or a node above it)."""
        return (
            self.reads_any_node
            or any(key == p or key.startswith(p + ".") for p in self.read_paths)
            or any(part in self.read_names for part in key.split("."))
        )

    def settable(self, override: Override) -> bool:
        """A plain value for an existing leaf that no interpolation reads: set on the resolved copy."""
        if override.type != OverrideType.CHANGE or override.is_sweep_override():
            return False
        value = override.value()
        if not isinstance(value, SCALARS) or (isinstance(value, str) and ("${" in value or "\\" in value)):
            return False
        *parents, last = override.key_or_group.split(".")
        node: Any = self.values
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node or isinstance(node[last], (dict, list)):
            return False
        return not self.is_read(override.key_or_group)


def strings(tree: Any) -> Iterator[str]:
    """Every string value of plain nested dicts and lists."""
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            yield from strings(item)
    elif isinstance(tree, str):
        yield tree


def copy_tree(tree: Any) -> Any:
    """A copy of plain nested dicts and lists (copy.deepcopy is several times slower)."""
    if isinstance(tree, dict):
        return {k: copy_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [copy_tree(v) for v in tree]
    return tree


class JobComposer:
    """A job's overrides -> its resolved config (plain Python), as Hydra would compose it."""

    def __init__(self, config_name: str = "config"):
        self.config_name = config_name
        self.composed: dict[tuple[str, ...], ComposedFiles | ComposeFailed] = {}

    def files(self, choices: tuple[str, ...]) -> ComposedFiles:
        if choices not in self.composed:
            try:
                self.composed[choices] = ComposedFiles.of(compose(self.config_name, overrides=list(choices)))
            except COMPOSE_ERRORS as e:
                self.composed[choices] = ComposeFailed(hydra_message(e))
        found = self.composed[choices]
        if isinstance(found, ComposeFailed):
            raise found
        return found

    def values(self, job: Sequence[str], overrides: Sequence[Override]) -> dict[str, Any]:
        """``overrides``: the job's arguments parsed (Hydra's parser), one per argument. Raises
        ComposeFailed. Call inside :func:`hydra_context`."""
        files = self.files(tuple(line for line, o in zip(job, overrides) if is_group_override(o)))
        settings = [o for o in overrides if not is_group_override(o)]
        if all(files.settable(o) for o in settings):
            values = copy_tree(files.values)
            for o in settings:
                *parents, last = o.key_or_group.split(".")
                node = values
                for part in parents:
                    node = node[part]
                node[last] = o.value()
            return values
        cfg = copy.deepcopy(files.cfg)
        try:
            ConfigLoaderImpl._apply_overrides_to_config(settings, cfg)
            return OmegaConf.to_container(cfg, resolve=True)
        except COMPOSE_ERRORS as e:
            raise ComposeFailed(hydra_message(e)) from None

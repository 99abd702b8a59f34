"""The method contract: a method is one module and one YAML.

A toy method defined here, and nowhere else, runs end to end on the tiny model (its YAML written
to a temporary folder on Hydra's search path) and the report shows it by its own display name
and colour. The harness (benchmark/) names no method, and no method module imports the harness.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmark.report import display
from benchmark.report.cli import write_report
from benchmark.report.tables import build_report
from methods.common.base import Method, MethodConfig
from methods.common.conditioning import encode_text
from methods.common.diffusion import denoising_loss, encode_latents, noisy_latents
from methods.common.errors import ConfigError
from methods.common.registry import method_class, method_classes, method_names
from tests.conftest import run_sweep_in_process

REPO = Path(__file__).resolve().parents[2]
TOY_NAME, TOY_DISPLAY, TOY_COLOR = "toy_scale", "Toy output scale", "#123456"


@dataclasses.dataclass
class ToyScaleConfig(MethodConfig):
    init: float = 1.0


class ToyScale(Method):
    """One trainable number: the U-Net's output times ``scale`` (its conv_out scaled), the rest
    frozen; ``apply`` folds it into conv_out's weight and bias (no inference cost)."""

    name = TOY_NAME
    display_name = TOY_DISPLAY
    color = TOY_COLOR
    Config = ToyScaleConfig

    def setup(self, components, subject) -> None:
        self.c, self.subject = components, subject
        for module in (*components.text_encoders, components.vae, components.unet):
            module.requires_grad_(False)
        self.scale = torch.nn.Parameter(torch.tensor(self.cfg.init, device=components.device))
        components.unet.conv_out.register_forward_hook(lambda _m, _i, out: out * self.scale.to(out.dtype))
        self.optimizer = torch.optim.SGD([self.scale], lr=self.cfg.lr)
        with torch.no_grad():
            self.text = encode_text(components, [f"a photo of {self.subject_phrase(subject)}"])

    def step(self, batch, step):
        c, g = self.c, batch["generator"]
        latents = encode_latents(c.vae, batch["pixel_values"].to(c.device), g)
        t = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g)
        z_t, target = noisy_latents(c.noise_scheduler, latents, t, g)
        loss = denoising_loss(c.unet, z_t, t, self.text.expand(len(latents)), target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def trainable_parameters(self):
        return {"scale": self.scale}

    def state_dict(self):
        return {"scale": self.scale.detach().reshape(1)}

    def apply(self, pipeline, artifact) -> None:
        conv = pipeline.unet.conv_out
        with torch.no_grad():
            conv.weight *= artifact["scale"].to(conv.weight)
            conv.bias *= artifact["scale"].to(conv.bias)

    def subject_phrase(self, subject) -> str:
        return f"sks {subject.class_noun}"


TOY_YAML = f"""\
name: {TOY_NAME}
steps: 4
lr: 0.5
resolution: ${{model.resolution}}
init: 1.0
"""


def toy_conf(tmp_path: Path) -> str:
    """A Hydra search-path folder holding the toy's conf/method YAML: the override naming it."""
    folder = tmp_path / "conf" / "method"
    folder.mkdir(parents=True)
    (folder / f"{TOY_NAME}.yaml").write_text(TOY_YAML)
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


# -- a method defined outside methods/, benchmark/ and conf/ --------------------------------


def test_a_class_registers_itself_and_unknown_names_are_refused():
    assert method_class(TOY_NAME) is ToyScale
    assert TOY_NAME not in method_names()  # the shipped methods only: other tests loop over those
    assert (ToyScale.gradient_free, ToyScale.teacher_kind, ToyScale.step_unit) == (False, "lora", "step")
    with pytest.raises(
        ConfigError,
        match=r"unknown method 'nope'; choose one of: boft, custom_diffusion, dreambooth, .*toy_scale",
    ):
        method_class("nope")
    with pytest.raises(TypeError, match="taken by"):
        type("Impostor", (ToyScale,), {"name": TOY_NAME})


def test_a_toy_method_runs_end_to_end_and_the_report_shows_it(tmp_path, dataset_root, monkeypatch):
    import matplotlib.figure

    from benchmark.report import plots

    results = tmp_path / "results"
    args = [
        toy_conf(tmp_path), "experiment=table1", f"method={TOY_NAME}", "subject=dog6", "model=tiny",
        f"data.root={dataset_root}", f"paths.results={results}", "train.progress=false",
    ]  # fmt: skip
    (record,) = run_sweep_in_process([*args, "train.profile_steps=0"])
    assert record["status"] == "ok" and record["method"] == TOY_NAME
    artifact = next((results / "runs" / TOY_NAME).glob("*/*/artifact.safetensors"))
    assert load_file(str(artifact))["scale"].item() != 1.0  # it trained: the scale moved off its start
    report = build_report([*args, "train.profile_steps=0"])
    files = {p.name: p for p in write_report(report)}
    assert f"| {TOY_DISPLAY}" in files["table.md"].read_text()
    assert TOY_DISPLAY in files["table.tex"].read_text()

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    report.table["memory_gb"] = 1.0  # the smoke run profiled nothing: a point to draw
    plots.memory_vs_score(report, tmp_path / "figures")
    colours = {line.get_color() for fig in saved for ax in fig.axes for line in ax.get_lines()}
    assert TOY_COLOR in colours


# -- the shipped methods --------------------------------------------------------------------

DISPLAY = {  # what every report, table and figure shows
    "dreambooth": ("DreamBooth", "#0072B2"), "qlora": ("QLoRA", "#E69F00"), "peqa": ("PEQA", "#009E73"),
    "tuneqdm": ("TuneQDM", "#CC79A7"), "ti": ("TI", "#56B4E9"), "gfti": ("GF-TI", "#D55E00"),
    "zoodip": ("ZOODiP", "#000000"), "hollowed": ("Hollowed Net", "#F0E442"), "lora": ("LoRA", "#999999"),
    "selective": ("Selective BP/ZO", "#882255"), "custom_diffusion": ("Custom Diffusion", "#DDCC77"),
    "loha": ("LoHa", "#44AA99"), "lokr": ("LoKr", "#117733"), "oft": ("OFT", "#88CCEE"),
    "boft": ("BOFT", "#332288"), "vera": ("VeRA", "#AA4499"),
}  # fmt: skip


def test_every_shipped_method_is_one_module_and_one_yaml_and_declares_how_it_is_shown():
    yamls = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
    assert method_names() == yamls == sorted(DISPLAY)
    for name, cls in method_classes().items():
        assert cls.name == name and cls.__module__ == f"methods.{name}"
        assert (cls.display_name, cls.color) == DISPLAY[name]
        assert (display.method_name(name), display.method_color(name)) == DISPLAY[name]
    teachers = {name: cls.teacher_kind for name, cls in method_classes().items()}
    assert {n for n, kind in teachers.items() if kind == "token"} == {"ti", "gfti", "zoodip"}
    assert {n for n, kind in teachers.items() if kind == "scales"} == {"peqa", "tuneqdm"}


def string_constants(tree: ast.AST) -> list[ast.Constant]:
    """The tree's string constants, docstrings left out."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_the_harness_names_no_method():
    names = set(method_names())
    found = [
        f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}"
        for path in sorted((REPO / "benchmark").rglob("*.py"))
        for node in string_constants(ast.parse(path.read_text(), str(path)))
        if node.value in names
    ]
    assert not found, "benchmark/ decides by method name; declare it on the method class:\n" + "\n".join(
        found
    )


def imported_modules(tree: ast.AST, runtime_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in the tree, those inside functions included; with
    ``runtime_only``, not those under ``if TYPE_CHECKING:`` (never executed)."""
    skipped = set()
    if runtime_only:
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.If)
                and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"
            ):
                skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_method_module_imports_the_harness():
    found = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in sorted((REPO / "methods").rglob("*.py"))
        for line, module in imported_modules(ast.parse(path.read_text(), str(path)))
        if module == "benchmark" or module.startswith("benchmark.")
    ]
    assert not found, "\n".join(found)


def test_methods_top_level_holds_only_the_method_modules():
    top = sorted(p.stem for p in (REPO / "methods").glob("*.py") if p.stem != "__init__")
    packages = sorted(p.name for p in (REPO / "methods").iterdir() if (p / "__init__.py").exists())
    assert top == method_names() and packages == ["common"]

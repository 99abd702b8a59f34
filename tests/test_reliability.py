"""Reliability: bad input fails fast with one line naming the value; a kill, a NaN, an
out-of-memory error or a second sweep never loses work, corrupts a file or passes silently."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException

import methods.common.atomic
from benchmark import models
from benchmark.config import method_config, training_dtype
from benchmark.records import CorruptRecord, load_records, new_record, read_record, write_record
from benchmark.run import BUSY, LOCK_NAME, USER_ERRORS, run, run_dir_for
from benchmark.schema import typed_config
from benchmark.train import CHECKPOINT_NAME, TrainingInterrupted, save_checkpoint, train
from methods.common.atomic import DiskFull, exclusive_lock, is_out_of_space, write_text_atomic
from methods.common.base import Method, MethodConfig
from methods.common.registry import method_class, method_names
from methods.ti import TextualInversion
from tests.conftest import CONF_DIR, REPO, compose

TIMING_FIELDS = ("train_seconds", "it_per_s", "generation_seconds")
CLI = [sys.executable, "-m", "benchmark"]
CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _method_case(method: str, *overrides: str, expect: str, xfail: str | None = None):
    marks = [pytest.mark.skipif(method not in method_names(), reason=f"method {method} not registered yet")]
    if xfail:
        marks.append(pytest.mark.xfail(reason=xfail, strict=True))
    return pytest.param(
        [f"method={method}", *overrides], expect, marks=marks, id=f"{method}:{' '.join(overrides)}"
    )


# (overrides on the tiny model, text the one-line message must contain)
BAD_INPUTS = [
    pytest.param(["subject=dogX"], "subject='dogX'", id="unknown subject"),
    pytest.param(["mode=train"], "mode='train'", id="unknown mode"),
    pytest.param(["seed=abc"], "'abc'", id="seed not an integer"),
    pytest.param(["+train.max_step=3"], "train.max_step", id="unknown key"),
    pytest.param(["device=tpu"], "device='tpu'", id="unknown device"),
    pytest.param(["method.steps=0"], "method.steps=0", id="steps < 1"),
    pytest.param(["train.max_steps=0"], "train.max_steps=0", id="max_steps < 1"),
    pytest.param(["train.step_delay_s=-1"], "train.step_delay_s=-1", id="step delay < 0"),
    pytest.param(["method.resolution=60"], "method.resolution=60", id="resolution not a multiple of 8"),
    pytest.param(["model.resolution=100"], "model.resolution=100", id="model resolution not a multiple of 8"),
    pytest.param(["method.timesteps=puts", "method.T_L=900", "method.T_U=500"], "T_L=900", id="T_L >= T_U"),
    pytest.param(["method.T_L=-1"], "T_L=-1", id="T_L < 0"),
    pytest.param(["method.T_U=1001"], "T_U=1001", id="T_U > T"),
    pytest.param(["model.num_train_timesteps=800"], "T_U=900", id="T_U > the model's T"),
    pytest.param(["eval.num_prompts=26"], "eval.num_prompts=26", id="more prompts than the dataset has"),
    pytest.param(["eval.dino_inter.prompt_index=5"], "prompt_index=5", id="DINO-inter prompt not generated"),
    _method_case("ti", "method.placeholder_token=dog", expect="'dog'"),
    _method_case("zoodip", "method.placeholder_token=dog", expect="'dog'"),
    _method_case("gfti", "method.placeholder_token='<|endoftext|>'", expect="'<|endoftext|>'"),
    _method_case("zoodip", "method.tau=1", expect="tau=1"),
    _method_case("zoodip", "method.nu=0", expect="nu=0"),
    _method_case("zoodip", "method.nu=1", expect="nu=1"),
    _method_case("zoodip", "method.n=0", expect="n=0"),
    _method_case("zoodip", "method.mu=0", expect="mu=0"),
    _method_case("zoodip", "method.mu=-1e-3", expect="mu=-0.001"),
    _method_case("selective", "method.n=0", expect="n=0"),
    _method_case("selective", "method.mu=0", expect="mu=0"),
    _method_case("peqa", "method.bits=3", expect="bits=3"),
    _method_case("tuneqdm", "method.bits=16", expect="bits=16"),
    _method_case("lora", "method.rank=0", expect="rank=0"),
    _method_case("qlora", "method.rank=0", expect="rank=0"),
    _method_case("hollowed", "method.rank=0", expect="rank=0"),
    _method_case("selective", "method.rank=0", expect="rank=0"),
    _method_case("hollowed", "method.fraction=1.0", expect="fraction=1.0"),
    _method_case("hollowed", "method.fraction=-0.1", expect="fraction=-0.1"),
    _method_case("ti", "method.data.flip_p=1.5", expect="flip_p=1.5"),
    _method_case("lora", "method.data.sampling=shuffle", expect="sampling='shuffle'"),
    _method_case("zoodip", "method.data.repeats=0", expect="repeats=0"),
    _method_case("ti", "method.lr=inf", expect="method.lr=inf must be a finite number"),
    _method_case("zoodip", "method.mu=nan", expect="method.mu=nan"),
    pytest.param(["eval.guidance_scale=inf"], "eval.guidance_scale=inf", id="guidance scale inf"),
    _method_case("ti", "method.placeholder_token=" + "x" * 20_000, expect="20000 characters"),
    _method_case("zoodip", "method.placeholder_token='<my token>'", expect="without spaces"),
]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Bad input must fail before any model is built or read."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(models, "load_components", refuse)
    monkeypatch.setattr(models, "build_from_config", refuse)


def _assert_refused(cfg, expect: str, results: Path) -> str:
    with pytest.raises(USER_ERRORS) as err:
        run(cfg)
    message = str(err.value)
    assert expect in message, message
    assert "\n" not in message
    assert not (results / "runs").exists()  # nothing written, nothing trained
    return message


@pytest.mark.parametrize("overrides, expect", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_value(overrides, expect, tiny_cfg, tmp_path, no_model_loads):
    _assert_refused(tiny_cfg(*overrides), expect, tmp_path / "results")


def test_unknown_names_are_reported_with_the_options():
    for group in ("method", "model", "eval", "experiment"):
        with pytest.raises(MissingConfigException) as err:
            compose([f"{group}=no_such_{group}"])
        message = str(err.value)
        assert f"Could not find '{group}/no_such_{group}'" in message
        for option in (p.stem for p in (CONF_DIR / group).glob("*.yaml")):
            assert f"\t{option}\n" in message, option


def _subject_copy(dataset_root: Path, root: Path, n: int = 2) -> Path:
    (root / "dog6").mkdir(parents=True)
    for image in sorted((dataset_root / "dog6").glob("*.jpg"))[:n]:
        shutil.copy(image, root / "dog6" / image.name)
    return root / "dog6"


def _data_cfg(tmp_path, root, *overrides):
    return compose(["model=tiny", f"data.root={root}", f"paths.results={tmp_path / 'results'}", *overrides])


def test_dataset_root_without_the_subject(tmp_path, dataset_root, no_model_loads):
    (tmp_path / "data" / "cat").mkdir(parents=True)  # another subject is there, dog6 is not
    message = _assert_refused(_data_cfg(tmp_path, tmp_path / "data"), "'dog6'", tmp_path / "results")
    assert str(tmp_path / "data") in message and "data.root=" in message


@pytest.mark.parametrize("content", [b"not an image", b""], ids=["text", "empty"])
def test_unreadable_image_among_the_subject_s(content, tmp_path, dataset_root, no_model_loads):
    folder = _subject_copy(dataset_root, tmp_path / "data")
    (folder / "03.jpg").write_bytes(content)
    message = _assert_refused(
        _data_cfg(tmp_path, tmp_path / "data"), str(folder / "03.jpg"), tmp_path / "results"
    )
    assert "remove or replace it" in message


def test_a_truncated_jpeg_is_named_before_the_run(tmp_path, dataset_root, no_model_loads):
    folder = _subject_copy(dataset_root, tmp_path / "data")
    whole = (folder / "00.jpg").read_bytes()
    (folder / "00.jpg").write_bytes(whole[: len(whole) // 2])  # the header is intact: verify() passes it
    message = _assert_refused(
        _data_cfg(tmp_path, tmp_path / "data"), str(folder / "00.jpg"), tmp_path / "results"
    )
    assert "truncated" in message and "remove or replace it" in message


def test_the_run_key_follows_the_images_not_their_folder(tmp_path, dataset_root):
    """A copied dataset is the same run; a changed image, a removed one or a renamed one is another."""
    here = run_dir_for(_data_cfg(tmp_path, dataset_root))
    copy = _subject_copy(dataset_root, tmp_path / "copy", n=100)
    assert run_dir_for(_data_cfg(tmp_path, copy.parent)) == here
    first = sorted(copy.glob("*.jpg"))[0]
    first.write_bytes(first.read_bytes()[:-1] + b"\0")  # one byte of one image
    changed = run_dir_for(_data_cfg(tmp_path, copy.parent))
    assert changed != here and changed.parent == here.parent
    assert changed.name.rsplit("-", 1)[0] == here.name.rsplit("-", 1)[0]  # the same configuration
    shutil.copy(dataset_root / "dog6" / first.name, first)  # fixed in place: the first run again
    assert run_dir_for(_data_cfg(tmp_path, copy.parent)) == here
    first.rename(first.with_name("renamed.jpg"))
    assert run_dir_for(_data_cfg(tmp_path, copy.parent)) != here
    first.with_name("renamed.jpg").unlink()
    assert run_dir_for(_data_cfg(tmp_path, copy.parent)) != here


def test_the_tests_step_delay_is_not_part_of_the_run_key(tiny_cfg):
    """A run slowed down for a SLURM test (train.step_delay_s) is the run an unslowed one makes."""
    here = run_dir_for(tiny_cfg())
    assert run_dir_for(tiny_cfg("train.step_delay_s=1")) == here
    assert run_dir_for(tiny_cfg("train.max_steps=3")) != here  # what a run computes is in it


def test_weights_path_that_is_not_a_diffusers_folder(tmp_path, dataset_root, no_model_loads):
    folder = tmp_path / "weights"
    (folder / "unet").mkdir(parents=True)
    cfg = compose(
        ["model=sd15", f"model.path={folder}", "eval=smoke", f"data.root={dataset_root}",
         f"paths.results={tmp_path / 'results'}"]
    )  # fmt: skip
    message = _assert_refused(cfg, f"model.path='{folder}'", tmp_path / "results")
    assert "model_index.json" in message


@pytest.mark.integration
def test_cli_prints_one_line_and_exits_2_on_bad_input(tmp_path, dataset_root):
    proc = _cli(
        "method=ti", "model=tiny", "method.steps=0", f"data.root={dataset_root}", f"paths.results={tmp_path}"
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: method.steps=0 must be >= 1"


@pytest.mark.parametrize("method", method_names())
def test_every_shipped_config_fits_the_schema(method):
    """Each conf/ file composes into the typed schema (a key added to a YAML file needs its field)."""
    for model in sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")):
        typed_config(compose([f"method={method}", f"model={model}"]))
    for eval_name in sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml")):
        typed_config(compose([f"method={method}", "model=tiny", f"eval={eval_name}"]))
    method_config(compose([f"method={method}", "model=tiny"]))


def test_every_experiment_fits_the_schema():
    for experiment in sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")):
        cfg = compose([f"experiment={experiment}"])
        typed_config(cfg)
        method_config(cfg)


# -- atomic writes ----------------------------------------------------------------------------


class _Tiny(Method):
    """Three numbers fitted by AdamW to noisy targets drawn from the step's generator."""

    name = "tiny_fake"

    def __init__(self, cfg=None):
        super().__init__(cfg or MethodConfig(name="tiny_fake", steps=10, lr=0.1))
        self.x = torch.nn.Parameter(torch.zeros(3))
        self.optimizer = torch.optim.AdamW([self.x], lr=self.cfg.lr)
        self.on_step = None

    def setup(self, components, subject):
        pass

    def step(self, batch, step):
        if self.on_step:
            self.on_step(step)
        target = torch.randn(3, generator=batch["generator"])
        loss = ((self.x - target) ** 2).sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {"loss": loss.detach()}

    def trainable_parameters(self):
        return {"x": self.x}

    def state_dict(self):
        return {"x": self.x.detach()}

    def apply(self, pipeline, artifact):
        pass

    def subject_phrase(self, subject):
        return "sks"


def _record(status="ok", **fields):
    return new_record(method="ti", subject="dog6", seed=0, status=status, run_key="k", **fields)


WRITERS = {
    "record": lambda d, v: write_record(d, _record(clip_t=v)),
    "checkpoint": lambda d, v: save_checkpoint(d / CHECKPOINT_NAME, int(v * 10), _Tiny(), 1.0),
    "artifact": lambda d, v: _fake_artifact(d, v),
    "text": lambda d, v: write_text_atomic(d / "config.yaml", f"value: {v}\n"),
}


def _fake_artifact(directory: Path, value: float) -> Path:
    method = _Tiny()
    with torch.no_grad():
        method.x.fill_(value)
    return method.save_artifact(directory)


@pytest.mark.parametrize("what", sorted(WRITERS))
def test_a_failure_between_write_and_rename_keeps_the_old_file(what, tmp_path, monkeypatch):
    WRITERS[what](tmp_path, 0.5)
    (path,) = [p for p in tmp_path.iterdir()]
    before = path.read_bytes()

    def crash(src, dst):
        assert Path(src).stat().st_size > 0  # the new content was fully written, then we "die"
        raise OSError("injected: killed before the rename")

    monkeypatch.setattr(methods.common.atomic.os, "replace", crash)
    with pytest.raises(OSError, match="injected"):
        WRITERS[what](tmp_path, 0.7)
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left behind

    monkeypatch.undo()
    WRITERS[what](tmp_path, 0.7)
    assert path.read_bytes() != before


def test_the_report_refuses_a_corrupt_record_with_its_path(tmp_path):
    good, torn, alien = (tmp_path / "runs" / "ti" / "dog6" / k for k in ("a", "b", "c"))
    write_record(good, _record())
    write_record(torn, _record())
    (torn / "record.json").write_text((torn / "record.json").read_text()[:40])  # a torn write
    with pytest.raises(CorruptRecord, match=str(torn / "record.json")):
        load_records(tmp_path)
    shutil.rmtree(torn)
    write_record(alien, _record())
    (alien / "record.json").write_text(json.dumps({**_record(), "status": "done"}))
    with pytest.raises(CorruptRecord, match=f"{alien / 'record.json'}.*'done'"):
        read_record(alien / "record.json")


def test_a_truncated_checkpoint_is_moved_aside_and_training_restarts(tmp_path, caplog):
    _, straight = _train_fake(tmp_path / "straight", steps=4)
    torn = tmp_path / "torn"
    _train_fake(torn, steps=4, checkpoint_every=2)  # leaves the checkpoint of step 2
    checkpoint = (torn / CHECKPOINT_NAME).read_bytes()
    (torn / CHECKPOINT_NAME).write_bytes(checkpoint[: len(checkpoint) // 2])
    with caplog.at_level("WARNING", logger="benchmark.train"):
        method, result = _train_fake(torn, steps=4)
    (aside,) = torn.glob(f"{CHECKPOINT_NAME}.corrupt-*")
    assert aside.read_bytes() == checkpoint[: len(checkpoint) // 2]  # kept as it was
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(torn / CHECKPOINT_NAME) in warning and aside.name in warning and "step 0" in warning
    assert result.resumed_from == 0 and result.final_loss == straight.final_loss
    assert method.x.tolist() == _train_fake(tmp_path / "again", steps=4)[0].x.tolist()


# -- interruption and resume ------------------------------------------------------------------


def _train_fake(run_dir, steps=8, **kwargs) -> tuple[_Tiny, object]:
    method = _Tiny()
    result = train(
        method, torch.zeros(2, 3, 8, 8), steps, 1, 0, run_dir, torch.device("cpu"), progress=False, **kwargs
    )
    return method, result


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need the main thread"
)
def test_sigterm_checkpoints_the_step_and_the_rerun_continues_bit_identically(tmp_path):
    straight, _ = _train_fake(tmp_path / "straight")

    stopped = _Tiny()
    stopped.on_step = lambda step: step == 2 and signal.raise_signal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as err:
        train(
            stopped,
            torch.zeros(2, 3, 8, 8),
            8,
            1,
            0,
            tmp_path / "stopped",
            torch.device("cpu"),
            progress=False,
        )
    assert err.value.step == 3 and err.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert (tmp_path / "stopped" / CHECKPOINT_NAME).exists()

    resumed, result = _train_fake(tmp_path / "stopped")
    assert result.resumed_from == 3
    assert torch.equal(resumed.x, straight.x)


def test_resume_restores_the_optimizer_state(tmp_path, monkeypatch):
    """The check above can fail: a resume that forgets AdamW's moments ends elsewhere."""
    straight, _ = _train_fake(tmp_path / "straight")
    _train_fake(tmp_path / "resumed", steps=8, checkpoint_every=3)  # leaves the step-6 checkpoint
    resumed, result = _train_fake(tmp_path / "resumed")
    assert result.resumed_from == 6 and torch.equal(resumed.x, straight.x)

    forgetful = Method.checkpoint
    monkeypatch.setattr(_Tiny, "checkpoint", lambda self: {"trainable": forgetful(self)["trainable"]})
    _train_fake(tmp_path / "forgetful", steps=8, checkpoint_every=3)
    resumed, _ = _train_fake(tmp_path / "forgetful")
    assert not torch.equal(resumed.x, straight.x)


# methods whose own tests check a bit-identical resume (TI: test_textual_inversion.py, and the
# subprocess test below)
RESUME_TESTED_ELSEWHERE = {"dreambooth", "qlora", "peqa", "tuneqdm", "zoodip", "ti"}


@pytest.mark.parametrize("name", sorted(set(method_names()) - RESUME_TESTED_ELSEWHERE))
def test_every_method_resumes_bit_identically(name, tiny_cfg, dataset_root, tmp_path):
    from benchmark import data

    # GF-TI: 4 candidates x 2 repeats (batches of 2) resume as 20 x 5 do, at a tenth of the passes
    cfg = tiny_cfg(f"method={name}", *(("method.popsize=4", "method.repeats=2") if name == "gfti" else ()))
    method_cfg = method_config(cfg)
    subject = data.get_subject("dog6")
    images = data.load_images(data.subject_image_paths(dataset_root, subject)[:2], method_cfg.resolution)

    def fresh():
        method = method_class(name)(method_cfg)
        method.setup(models.load_components(cfg.model, dtype=training_dtype(method_cfg)), subject)
        method.precompute(images, 0, 3)
        return method

    straight = fresh()  # checkpoints at step 2 and runs on to step 3
    train(
        straight,
        images,
        3,
        method_cfg.batch_size,
        0,
        tmp_path,
        torch.device("cpu"),
        checkpoint_every=2,
        progress=False,
    )
    resumed = fresh()
    result = train(
        resumed, images, 3, method_cfg.batch_size, 0, tmp_path, torch.device("cpu"), progress=False
    )
    assert result.resumed_from == 2
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        CLI + list(args), cwd=REPO, env=CLI_ENV, capture_output=True, text=True, timeout=900
    )


@pytest.mark.integration
def test_sigkill_mid_training_then_the_same_command_resumes_to_the_same_artifact(tmp_path, dataset_root):
    args = [
        "method=ti", "model=tiny", "method.lr=0.05", f"data.root={dataset_root}", "train.max_steps=6",
        "train.checkpoint_every=2", "train.profile_steps=0",  # the profiler: seconds a run, unread here
    ]  # fmt: skip
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    with open(tmp_path / "killed.log", "w") as log, open(tmp_path / "straight.log", "w") as straight_log:
        reference = subprocess.Popen(
            CLI + args + [f"paths.results={straight}"], cwd=REPO, env=CLI_ENV, stdout=straight_log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        proc = subprocess.Popen(
            CLI + args + [f"paths.results={killed}"],
            cwd=REPO,
            env=CLI_ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600
        while not list(killed.glob(f"runs/ti/dog6/*/{CHECKPOINT_NAME}")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.kill()  # SIGKILL: no handler runs, no clean-up
        proc.wait()
        assert reference.wait(timeout=900) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    (run_dir,) = killed.glob("runs/ti/dog6/*")
    assert not (run_dir / "record.json").exists() and not (run_dir / "trained.json").exists()

    rerun = _cli(*args, f"paths.results={killed}")  # the same command again
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    (straight_dir,) = straight.glob("runs/ti/dog6/*")
    assert straight_dir.name == run_dir.name
    resumed, uninterrupted = read_record(run_dir / "record.json"), read_record(straight_dir / "record.json")
    assert resumed["status"] == "ok" and resumed["resumed_from_step"] >= 2
    assert uninterrupted["resumed_from_step"] == 0
    artifact = "learned_embeds.safetensors"
    assert (run_dir / artifact).read_bytes() == (straight_dir / artifact).read_bytes()
    for key in ("final_loss", "clip_t", "clip_i", "dino", "dino_inter", "train_steps"):
        assert resumed[key] == uninterrupted[key], key
    assert not (run_dir / CHECKPOINT_NAME).exists()


@pytest.mark.integration
def test_a_kill_during_evaluation_does_not_train_again(tiny_cfg, monkeypatch):
    import benchmark.run

    cfg = tiny_cfg("method=ti")
    real_evaluate = benchmark.run.evaluate

    def killed(*args, **kwargs):
        raise RuntimeError("injected: died while generating")

    monkeypatch.setattr(benchmark.run, "evaluate", killed)
    assert run(cfg)["status"] == "failed"
    monkeypatch.setattr(benchmark.run, "evaluate", real_evaluate)
    monkeypatch.setattr(benchmark.run, "train", lambda *a, **k: pytest.fail("trained again"))
    record = run(cfg)
    assert record["status"] == "ok" and record["train_steps"] == 4 and record["clip_t"] is not None
    assert record["generation_resumed_from_image"] is None  # the killed run had generated nothing


@pytest.mark.integration
def test_a_resumed_generation_says_so(tiny_cfg):
    cfg = tiny_cfg("method=ti")
    first = run(cfg)
    run_dir = run_dir_for(cfg)
    images = sorted((run_dir / "images").glob("*.png"))
    images[-1].unlink()  # as if killed before the last image
    (run_dir / "record.json").unlink()
    again = run(cfg)
    assert first["generation_resumed_from_image"] is None
    assert again["generation_resumed_from_image"] == len(images) - 1
    assert again["clip_t"] == first["clip_t"]  # the same images, whoever generated them


# -- faults become records --------------------------------------------------------------------


def _inject(monkeypatch, at_step: int, fault):
    original = TextualInversion.step

    def step(self, batch, step):
        logs = original(self, batch, step)
        if step == at_step:
            return fault(logs)
        return logs

    monkeypatch.setattr(TextualInversion, "step", step)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_loss_stops_the_run_as_diverged_with_its_step(bad, tiny_cfg, monkeypatch):
    _inject(monkeypatch, 2, lambda logs: {**logs, "loss": torch.tensor(bad)})
    cfg = tiny_cfg("method=ti")
    record = run(cfg)
    assert record["status"] == "diverged" and record["diverged_step"] == 2
    assert "step 2" in record["error"] and str(bad) in record["error"]
    run_dir = run_dir_for(cfg)
    assert read_record(run_dir / "record.json")["status"] == "diverged"
    assert not (run_dir / "learned_embeds.safetensors").exists()


def _raise(error):
    def fault(logs):
        raise error

    return fault


@pytest.mark.parametrize(
    "error",
    [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), MemoryError()],
    ids=["cuda", "host"],
)
def test_out_of_memory_is_a_record_not_a_crash_of_the_sweep(error, tiny_cfg, monkeypatch):
    _inject(monkeypatch, 1, _raise(error))
    cfg = tiny_cfg("method=ti")
    record = run(cfg)  # returns: the sweep's next job runs
    assert record["status"] == "oom" and record["error"].startswith(type(error).__name__)
    assert read_record(run_dir_for(cfg) / "record.json") == record
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "it_per_s"):
        assert key in record  # the memory reached where the device measures it (CUDA); null on CPU


def test_any_other_exception_is_a_failed_record(tiny_cfg, monkeypatch):
    _inject(monkeypatch, 0, _raise(RuntimeError("injected: boom\nsecond line")))
    record = run(tiny_cfg("method=ti"))
    assert record["status"] == "failed" and record["error"] == "RuntimeError: injected: boom"


@pytest.mark.integration
def test_same_seed_same_config_gives_the_same_record_numbers(tiny_cfg, tmp_path):
    first = run(tiny_cfg("method=ti", f"paths.results={tmp_path / 'a'}"))
    second = run(tiny_cfg("method=ti", f"paths.results={tmp_path / 'b'}"))
    assert first["status"] == second["status"] == "ok"
    assert {k: v for k, v in first.items() if k not in TIMING_FIELDS} == {
        k: v for k, v in second.items() if k not in TIMING_FIELDS
    }


# -- concurrency ------------------------------------------------------------------------------


def test_a_held_run_is_left_to_its_holder(tiny_cfg):
    cfg = tiny_cfg("method=ti")
    run_dir = run_dir_for(cfg)
    with exclusive_lock(run_dir / LOCK_NAME) as held:
        assert held
        with exclusive_lock(run_dir / LOCK_NAME) as second:
            assert not second
        assert run(cfg) == {"status": BUSY, "run_dir": str(run_dir)}
        assert not (run_dir / "record.json").exists()
    with exclusive_lock(run_dir / LOCK_NAME) as held:
        assert held  # released: the next attempt gets it


@pytest.mark.integration
def test_two_sweeps_into_one_results_dir(tmp_path, dataset_root):
    """Both sweeps finish; each run is trained once (the other sweep skips it while it is held, or
    finds it done) and every record is whole. A sweep that left a run to the other exits 3."""
    sweep = [
        "-m",
        "method=ti",
        "model=tiny",
        "seed=0,1",
        "train.max_steps=2",
        "train.profile_steps=0",
        f"data.root={dataset_root}",
        f"paths.results={tmp_path}",
    ]
    sweeps = [
        subprocess.Popen(
            CLI + sweep, cwd=REPO, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in sweeps]
    # 3: the sweep left a run to the other one (the same code as a single busy run)
    for p, out in zip(sweeps, outputs):
        assert p.returncode in (0, 3), out[-2000:]
        assert (p.returncode == 3) == ("busy: another process is running" in out), out[-2000:]
    run_dirs = sorted(tmp_path.glob("runs/ti/dog6/*"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        assert read_record(run_dir / "record.json")["status"] == "ok"
        trained = sum(out.count(f"ok: {run_dir / 'record.json'}") for out in outputs)
        assert trained == 1, f"{run_dir} was run {trained} times"
    assert not list(tmp_path.rglob("*.tmp"))


# -- disk full, unwritable folders, a run held elsewhere ---------------------------------------


def test_a_full_disk_is_named_by_the_file_being_written(tmp_path, monkeypatch):
    write_text_atomic(tmp_path / "config.yaml", "old\n")

    def full(self, data):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DiskFull) as exc:
        write_text_atomic(tmp_path / "config.yaml", "new\n")
    assert str(exc.value) == f"no space left on device writing {tmp_path / 'config.yaml'}"
    monkeypatch.undo()
    assert (tmp_path / "config.yaml").read_text() == "old\n" and len(list(tmp_path.iterdir())) == 1


def test_torch_and_safetensors_report_a_full_disk_in_their_own_words():
    torch_save = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not is_out_of_space(torch_save)
    try:
        try:
            raise OSError(28, os.strerror(28))
        except OSError as e:
            raise torch_save from e  # torch.save to a file object: raised from the OSError
    except RuntimeError as e:
        assert is_out_of_space(e)
    safetensors = "Error while serializing: I/O error: No space left on device (os error 28)"
    assert is_out_of_space(Exception(safetensors))


@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs (root only): a checkpoint of the tiny LoRA (~190 KB) does not fit, a
    record does."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_checkpointing_is_one_line_and_a_record(small_disk, tiny_cfg, caplog):
    cfg = tiny_cfg("method=lora", "train.checkpoint_every=1", f"paths.results={small_disk}")
    with caplog.at_level("ERROR"):
        record = run(cfg)
    checkpoint = run_dir_for(cfg) / CHECKPOINT_NAME
    assert record["status"] == "failed"
    assert record["error"] == f"no space left on device writing {checkpoint}"
    assert read_record(run_dir_for(cfg) / "record.json")["error"] == record["error"]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == [f"run failed: {record['error']}"]
    assert not any(r.exc_info for r in errors), "a traceback for a full disk"
    assert not list(small_disk.rglob("*.tmp"))


@pytest.mark.integration
def test_a_run_folder_that_cannot_be_written_is_refused_in_one_line(tmp_path, dataset_root):
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / "ti").write_text("a file where the method's folder goes")
    proc = _cli("method=ti", "model=tiny", f"data.root={dataset_root}", f"paths.results={results}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"error: cannot write the run folder {results / 'runs' / 'ti'}")
        and "paths.results=" in last
    )


@pytest.mark.integration
def test_a_run_held_by_another_process_exits_3_alone_and_in_a_sweep(tiny_cfg, dataset_root, tmp_path):
    fast = ["method=ti", "train.max_steps=1", "train.progress=false", "train.profile_steps=0"]
    held, other = run_dir_for(tiny_cfg(*fast)), run_dir_for(tiny_cfg(*fast, "seed=1"))
    common = [*fast, "model=tiny", f"data.root={dataset_root}", f"paths.results={tmp_path / 'results'}"]
    with exclusive_lock(held / LOCK_NAME):
        alone = _cli(*common)
        swept = _cli("-m", *common, "seed=0,1")
    assert alone.returncode == 3, alone.stderr[-2000:]
    assert swept.returncode == 3, swept.stderr[-2000:]
    assert "busy: 1 run(s) left to the process holding them" in swept.stderr
    assert not (held / "record.json").exists()
    assert read_record(other / "record.json")["status"] == "ok"  # the sweep's other run was done


def test_the_progress_bar_is_left_where_training_ended(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    method = _Tiny()
    train(method, torch.zeros(1, 3, 8, 8), 4, 1, 0, tmp_path, torch.device("cpu"), progress=True)
    shown = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert "4/4" in shown[-1] and "loss=" in shown[-1], shown[-3:]


@pytest.mark.parametrize(
    "overrides, earlier",  # the folders the earlier key gave these commands (data.root=/data/dreambooth)
    [
        (["method=ti", "model=tiny"], "ti/dog6/seed0-4514692cc1"),
        (["method=lora", "model=sd15", "seed=3", "eval=dreambooth"], "lora/dog6/seed3-9d2de2e3ca"),
    ],
)
def test_the_earlier_key_is_the_one_runs_were_made_under(overrides, earlier):
    from benchmark.config import earlier_run_dir

    cfg = compose([*overrides, "data.root=/data/dreambooth", "paths.results=/r"])
    assert earlier_run_dir(cfg) == Path("/r/runs") / earlier


def test_a_run_made_under_the_earlier_key_is_found_not_trained_again(tiny_cfg, monkeypatch):
    from benchmark.config import earlier_run_dir

    cfg = tiny_cfg("method=ti")
    earlier, current = earlier_run_dir(cfg), run_dir_for(cfg)
    assert earlier != current and earlier.parent == current.parent
    done = {**_record(), "status": "ok", "run_key": earlier.name}
    write_record(earlier, done)
    monkeypatch.setattr(models, "load_components", lambda *a, **k: pytest.fail("trained again"))
    assert run(cfg)["run_key"] == earlier.name  # the record as it was
    assert not earlier.exists() and read_record(current / "record.json") == done

"""A checkpoint is a snapshot on the CPU: every tensor copied there when it is taken (no GPU
memory spent on it, and no reference to live optimizer state that the next step changes)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmark import data
from benchmark.train import step_generator
from methods.common.base import Method, cpu_copy
from tests.conftest import set_up_method


def tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in tensors(v)]
    return []


class OneParameter(Method):
    """The base class's checkpoint over one trainable tensor and its AdamW state."""

    def __init__(self, parameter: torch.nn.Parameter):
        super().__init__(cfg=None)
        self.parameter = parameter
        self.optimizer = torch.optim.AdamW([parameter], lr=1e-3, foreach=False)

    def trainable_parameters(self):
        return {"weight": self.parameter}

    setup = step = state_dict = apply = subject_phrase = None


def test_a_checkpoint_of_gpu_tensors_is_on_the_cpu():
    with FakeTensorMode(allow_non_fake_inputs=True):  # 'cuda' tensors without a GPU
        method = OneParameter(torch.nn.Parameter(torch.empty(4, 3, device="cuda")))
        method.parameter.grad = torch.ones(4, 3, device="cuda")
        method.optimizer.step()
        assert method.optimizer.state_dict()["state"][0]["exp_avg"].device.type == "cuda"
        state = method.checkpoint()
        nested = cpu_copy({"m": [torch.empty(2, device="cuda")], "v": (torch.empty(2, device="cuda"),)})
    assert {t.device.type for t in tensors(state)} == {"cpu"}
    assert {t.device.type for t in tensors(nested)} == {"cpu"}


@pytest.fixture
def images(dataset_root):
    return data.load_images(data.subject_image_paths(dataset_root, data.get_subject("dog6")), 64)


def one_step(method, images, step):
    generator = step_generator(0, step)
    index = torch.randint(len(images), (1,), generator=generator)
    method.step({"pixel_values": images[index], "generator": generator, "index": index}, step)


@pytest.mark.parametrize(
    "overrides",
    [
        ("method=lora",),  # the base class's checkpoint: trainable tensors + Adam state
        ("method=ti",),
        ("method=zoodip", "method.precision=fp32"),
        ("method=gfti", "method.precision=fp32", "method.popsize=2", "method.repeats=1"),
        ("method=selective",),
    ],
    ids=lambda o: o[0],
)
def test_every_methods_checkpoint_is_a_cpu_snapshot(tiny_cfg, images, overrides):
    cfg = tiny_cfg(*overrides)
    method = set_up_method(cfg, images)
    one_step(method, images, 0)
    state = method.checkpoint()
    assert tensors(state) and all(t.device.type == "cpu" for t in tensors(state))
    taken = copy.deepcopy(state)
    one_step(method, images, 1)  # changes the live parameters and optimizer state in place
    for now, then in zip(tensors(state), tensors(taken)):
        assert torch.equal(now, then)

"""The CUDA code paths without a GPU. Under fake tensors (the memory tracker's mode) a tensor can
live on a fake ``cuda`` device: forward passes and no-grad work run, and a CPU/GPU mix raises
PyTorch's device-mismatch error, so a missing ``.to(device)`` fails here. Backward does not run on
a fake GPU: ``backward()`` hands the trained tensors zero gradients instead (their optimizer steps
still run). Every method runs its setup, precompute, steps, checkpoint and restore (the state
loaded onto the GPU) and the fp16 evaluation pipeline through the VAE decode, on the three model
families. The fp16 evaluation path also runs with real values on the CPU for every method."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map

from benchmark import data, models
from benchmark.config import make_method, method_config, training_dtype
from benchmark.memory.tracker import tracking
from benchmark.run import personalized_pipeline
from benchmark.train import step_generator
from methods.common.registry import method_class, method_names
from tests.conftest import set_up_method

CUDA = torch.device("cuda")
FAMILIES = ("tiny", "tiny_sd21", "tiny_sdxl")
FAST = {"gfti": ("method.popsize=2", "method.repeats=1")}  # GF-TI: fewer candidates, same code


def fake_gpu(quantizers: bool = True):
    """Fake tensors that may live on a ``cuda`` device (no GPU needed). ``quantizers``: our
    quantizers compute codes and scales (their device handling checked), rather than the
    memory predictor's shortcut that only makes tensors of their shapes (faster)."""
    return tracking(fake=True, fast_quantizers=not quantizers)


@contextlib.contextmanager
def zero_gradients_on_backward(trained: list[torch.Tensor]):
    """``backward()`` gives ``trained`` zero gradients; yields the losses it was called on."""
    calls = []
    own = torch.Tensor.backward

    def backward(loss, *args, **kwargs):
        calls.append(loss)
        for t in trained:
            t.grad = torch.zeros_like(t)

    torch.Tensor.backward = backward
    try:
        yield calls
    finally:
        torch.Tensor.backward = own


def on_gpu(tensors) -> bool:
    return all(t.device.type == "cuda" for t in tensors)


def network_tensors(holder) -> list[torch.Tensor]:
    """The parameters and buffers of the networks of components or a pipeline."""
    names = ("text_encoder", "text_encoder_2", "vae", "unet")
    modules = [getattr(holder, n) for n in names if getattr(holder, n, None) is not None]
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def test_a_cpu_gpu_mix_raises_on_the_fake_gpu():
    """What the tests below rely on: the fake GPU refuses what a real one refuses."""
    with fake_gpu():
        weight = torch.ones(4, 4, device=CUDA)
        with pytest.raises(RuntimeError, match="device"):
            weight @ torch.ones(4, 4)  # an input left on the CPU
        with pytest.raises(RuntimeError, match="generator"):
            torch.randn(4, device=CUDA, generator=torch.Generator())  # a CPU generator drawing on the GPU
        assert (weight @ torch.ones(4, 4).to(CUDA)).device.type == "cuda"


# On SD2.1's family, every backprop method runs with its leanest memory savers (methods/common/
# savers.py): CUDA's autocast, its loss scaler and bitsandbytes' 8-bit AdamW on the GPU's tensors.
LEANEST = ("train.mixed_precision=fp16", "train.gradient_checkpointing=true", "method.optimizer=adamw8bit")
LEANEST_FAMILY = "tiny_sd21"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", method_names())
def test_every_method_runs_on_a_fake_gpu(name, family, tiny_cfg, dataset_root):
    lean = family == LEANEST_FAMILY and not method_class(name).gradient_free
    cfg = tiny_cfg(f"model={family}", f"method={name}", *FAST.get(name, ()), *(LEANEST if lean else ()))
    method_cfg = method_config(cfg)
    subject = data.get_subject("dog6")
    pixels = data.load_images(data.subject_image_paths(dataset_root, subject), method_cfg.resolution)

    def set_up():  # as benchmark.run.train_and_save does it
        components = models.load_components(cfg.model, device=CUDA, dtype=training_dtype(method_cfg))
        method = make_method(cfg, method_cfg)
        method.setup(components, subject)
        method.precompute(images, 0, 3)
        assert on_gpu(network_tensors(components)), "a network left on the CPU"
        if lean:  # frozen weights fp16 and trained ones fp32, the loss scaled
            trained = list(method.trainable_parameters().values())
            assert {p.dtype for p in trained} == {torch.float32}
            frozen = [t for m in method.half_modules() for t in m.parameters() if not t.requires_grad]
            assert {t.dtype for t in frozen if t.is_floating_point()} == {torch.float16}
            assert method.scaler is not None
        return method

    def step(method, s: int):
        generator = step_generator(0, s)
        index = torch.randint(len(images), (method_cfg.batch_size,), generator=generator)
        batch = {"pixel_values": images[index], "generator": generator, "index": index}
        with zero_gradients_on_backward(list(method.trainable_parameters().values())) as backward:
            loss = method.step(batch, s)["loss"]
        assert on_gpu(backward), "backward of a loss on the CPU"
        assert isinstance(loss, (float, torch.Tensor))
        assert bool(backward) != method.gradient_free, "backward: called by a ZO method, or not by a BP one"

    with fake_gpu(quantizers=family == "tiny"):  # the quantizers' code is the same for every family
        images = pixels.to(CUDA)
        method = set_up()
        step(method, 0)
        state = method.checkpoint()
        saved = [t for t in tree_leaves(state) if isinstance(t, torch.Tensor)]
        assert saved and all(t.device.type == "cpu" for t in saved)
        # as a resumed run loads it (map_location="cuda"); restored into the same method, which
        # spares a second setup
        method.restore(tree_map(lambda t: t.to(CUDA) if isinstance(t, torch.Tensor) else t, state))
        step(method, 1)
        if lean:  # the 8-bit moments on the GPU
            state = [v for values in method.optimizer.state.values() for v in values.values()]
            moments = [v for v in state if isinstance(v, torch.Tensor)]
            assert moments and on_gpu(moments)
            if any(p.numel() >= 4096 for p in method.trainable_parameters().values()):
                assert any(t.dtype == torch.uint8 for t in moments)
        trained = method.state_dict()
        assert on_gpu(trained.values())
        artifact = {k: torch.empty_like(v, device="cpu") for k, v in trained.items()}  # read from disk
        fresh = method_class(name)(method_cfg)
        pipeline = personalized_pipeline(cfg.model, fresh, artifact, CUDA, torch.float16)
        assert on_gpu(network_tensors(pipeline))
        assert {t.dtype for t in network_tensors(pipeline) if t.is_floating_point()} == {torch.float16}
        pipeline.vae.enable_slicing()
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        images_out = pipeline(["a photo of a dog"] * 2, num_inference_steps=2, generator=generators).images
        assert len(images_out) == 2


@pytest.mark.parametrize("name", method_names())
def test_the_fp16_evaluation_path_runs_with_real_values(name, tiny_cfg, dataset_root):
    """On the CPU too: the artifact of two real steps applied in an fp16 pipeline, as the
    evaluation on a GPU does, gives finite, non-constant images."""
    fp32 = ("method.precision=fp32",) if name in ("zoodip", "gfti") else ()  # fp16 steps: minutes on a CPU
    cfg = tiny_cfg(f"method={name}", *FAST.get(name, ()), *fp32)
    method_cfg = method_config(cfg)
    images = data.load_images(data.subject_image_paths(dataset_root, data.get_subject("dog6")), 64)
    method = set_up_method(cfg, images)
    for s in range(2):
        generator = step_generator(0, s)
        index = torch.randint(len(images), (method_cfg.batch_size,), generator=generator)
        method.step({"pixel_values": images[index], "generator": generator, "index": index}, s)
    artifact = {k: v.detach().cpu().clone() for k, v in method.state_dict().items()}
    fresh = method_class(name)(method_cfg)
    pipeline = personalized_pipeline(cfg.model, fresh, artifact, "cpu", torch.float16)
    assert {t.dtype for t in network_tensors(pipeline) if t.is_floating_point()} == {torch.float16}
    generator = [torch.Generator().manual_seed(0)]
    out = pipeline(["a photo of a dog"], num_inference_steps=2, generator=generator, output_type="np").images
    assert np.isfinite(out).all() and out.std() > 0

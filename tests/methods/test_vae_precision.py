"""An fp16 VAE that overflows in fp16 (``vae.config.force_upcast``: SDXL's) encodes in fp32, as
diffusers' SDXL pipeline decodes it; SD1.x/2.x VAEs encode in the method's dtype, as before."""

from __future__ import annotations

import pytest
import torch

from benchmark import data, models
from benchmark.config import method_config, training_dtype
from methods.common.registry import method_class


@pytest.fixture
def images(dataset_root):
    return data.load_images(data.subject_image_paths(dataset_root, data.get_subject("dog6")), 64)


def conv_input_dtypes_while_encoding(tiny_cfg, images, *overrides):
    cfg = tiny_cfg(*overrides)
    method_cfg = method_config(cfg)
    assert training_dtype(method_cfg) == torch.float16
    components = models.load_components(cfg.model, dtype=torch.float16)
    method = method_class(method_cfg.name)(method_cfg)
    method.setup(components, data.get_subject("dog6"))
    vae = components.vae
    before = {name: (t, t.dtype) for name, t in (*vae.named_parameters(), *vae.named_buffers())}
    seen: set[torch.dtype] = set()
    convs = [
        m for m in vae.modules() if isinstance(m, torch.nn.Conv2d) or type(m).__name__ == "QuantizedLayer"
    ]
    assert convs
    for conv in convs:
        conv.register_forward_pre_hook(lambda module, args: seen.add(args[0].dtype))
    method.precompute(images[:1], 0, 2)
    after = {name: (t, t.dtype) for name, t in (*vae.named_parameters(), *vae.named_buffers())}
    assert all(after[n][0] is t and after[n][1] == d for n, (t, d) in before.items() if n in after)
    return seen, vae.config.force_upcast


@pytest.mark.parametrize(
    "method",
    [
        ("method=zoodip",),
        ("method=gfti", "method.popsize=2", "method.repeats=1"),
        ("method=gfti", "method.popsize=2", "method.repeats=1", "method.protocol=ours"),
    ],
)
def test_sdxl_vae_encodes_in_fp32_when_the_method_runs_in_fp16(tiny_cfg, images, method):
    seen, force_upcast = conv_input_dtypes_while_encoding(tiny_cfg, images, "model=tiny_sdxl", *method)
    assert force_upcast
    assert seen == {torch.float32}


def test_sd1_vae_encodes_in_the_methods_fp16_as_its_pipeline_decodes(tiny_cfg, images):
    seen, force_upcast = conv_input_dtypes_while_encoding(tiny_cfg, images, "method=zoodip")
    assert not force_upcast
    assert seen == {torch.float16}

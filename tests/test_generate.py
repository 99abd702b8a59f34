"""Generation's evaluation-only settings: the VAE decodes one image at a time, and the batch size
is not part of the run key (a finished run evaluated with a smaller batch does not train again)."""

from __future__ import annotations

from types import SimpleNamespace

from PIL import Image

from benchmark.config import real_run_dir, run_dir_for
from benchmark.generate import EvalPrompt, generate_images


def test_eval_batch_size_is_not_part_of_the_run_key(tiny_cfg):
    here = tiny_cfg("eval.batch_size=10")
    assert run_dir_for(tiny_cfg("eval.batch_size=1")) == run_dir_for(here)
    assert real_run_dir(tiny_cfg("eval.batch_size=1", "mode=real")) == real_run_dir(here)
    assert run_dir_for(tiny_cfg("eval.guidance_scale=5")) != run_dir_for(here)  # what it computes is in it


class RecordingPipeline:
    """A stock pipeline's interface: a VAE, and a call that returns one image per prompt."""

    def __init__(self):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
        self.slicing_at_call: list[bool] = []

    def __call__(self, prompts, **kwargs):
        self.slicing_at_call.append(self.vae.use_slicing)
        return SimpleNamespace(images=[Image.new("RGB", (8, 8)) for _ in prompts])


def test_generation_decodes_with_vae_slicing(tiny_cfg, tmp_path):
    pipeline = RecordingPipeline()
    eval_cfg = tiny_cfg("eval.batch_size=3").eval
    generate_images(pipeline, [EvalPrompt(0, "a photo of a dog", "a photo of a dog")], eval_cfg, 0, tmp_path)
    assert pipeline.slicing_at_call and all(pipeline.slicing_at_call)

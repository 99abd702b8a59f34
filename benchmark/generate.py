"""Generate the evaluation images: for each of the subject's prompts, k seeded images.

Image i of prompt p always comes from the generator seeded (seed, p, i), whatever the batch
size, so a partially generated set resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from methods.common.atomic import atomic_path


@dataclass(frozen=True)
class EvalPrompt:
    index: int
    prompt: str  # what the personalized pipeline is asked for ("a <sks> in the jungle")
    clip_text: str  # what CLIP-T compares with: the placeholder removed ("a dog in the jungle")


def eval_prompts(subject, method, eval_cfg) -> list[EvalPrompt]:
    token_only = method.token_only_prompts and eval_cfg.drop_class_noun_for_token_methods
    phrase = method.subject_phrase(subject)
    if not token_only:
        phrase = f"{phrase} {subject.class_noun}"
    templates = subject.prompt_templates[: eval_cfg.num_prompts]
    return [EvalPrompt(i, t.format(phrase), t.format(subject.class_noun)) for i, t in enumerate(templates)]


def image_counts(eval_cfg, n_prompts: int) -> list[int]:
    """Images per prompt; the DINO-inter prompt gets enough for its group."""
    counts = [eval_cfg.images_per_prompt] * n_prompts
    p = eval_cfg.dino_inter.prompt_index
    if 0 <= p < n_prompts:
        counts[p] = max(counts[p], eval_cfg.dino_inter.images)
    return counts


def generate_images(
    pipeline, prompts: list[EvalPrompt], eval_cfg, seed: int, out_dir: Path
) -> dict[int, list[Path]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    decode_one_image_at_a_time(pipeline)
    paths: dict[int, list[Path]] = {}
    for prompt, count in zip(prompts, image_counts(eval_cfg, len(prompts))):
        paths[prompt.index] = [out_dir / f"p{prompt.index:02d}_{i:03d}.png" for i in range(count)]
        todo = [i for i in range(count) if not paths[prompt.index][i].exists()]
        for start in range(0, len(todo), eval_cfg.batch_size):
            chunk = todo[start : start + eval_cfg.batch_size]
            generators = [
                torch.Generator().manual_seed(seed * 1_000_003 + prompt.index * 1000 + i) for i in chunk
            ]
            images = pipeline(
                [prompt.prompt] * len(chunk),
                num_inference_steps=eval_cfg.num_inference_steps,
                guidance_scale=eval_cfg.guidance_scale,
                generator=generators,
            ).images
            for i, image in zip(chunk, images):
                save_png(image, paths[prompt.index][i])
    return paths


def decode_one_image_at_a_time(pipeline) -> None:
    """VAE slicing: the batch's latents decoded one image at a time. An fp32 decode of 10 SDXL
    images at 1024 px needs tens of GB of activations; sliced, one image's. Not in the run key."""
    vae = getattr(pipeline, "vae", None)
    if hasattr(vae, "enable_slicing"):
        vae.enable_slicing()


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")

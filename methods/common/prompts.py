"""Training prompt templates of the diffusers textual_inversion example (ImageNet-style)."""

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

IMAGENET_TEMPLATES_SMALL = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


def sample_prompts(phrase: str, batch_size: int, generator: torch.Generator) -> list[str]:
    """One random ImageNet-style template per sample, filled with ``phrase``."""
    # Choosing a string is host-side bookkeeping: keep it real even while the memory
    # predictor traces the step under FakeTensorMode.
    with unset_fake_temporarily():
        picks = torch.randint(len(IMAGENET_TEMPLATES_SMALL), (batch_size,), generator=generator).tolist()
    return [IMAGENET_TEMPLATES_SMALL[i].format(phrase) for i in picks]

"""GF-TI's initial token, as feizc's ``initialize_inversion.py``: a parameter-free
cross-attention of the subject's CLIP image features (queries) over ImageNet class-name
sentence features (keys), whose values are the class names' token embeddings.

- keys: for each of the 1,000 ImageNet class names (feizc's ``automatic_subjective_classnames``
  = open_clip's ``IMAGENET_CLASSNAMES``, duplicates included), CLIP's projected text feature of
  each of the 80 OpenAI ImageNet templates (feizc's ``imagenet_template``), each L2-normalized,
  averaged, normalized again;
- values: the mean input embedding of the class name's tokens;
- queries: each training image's L2-normalized projected CLIP image feature;
- e0 = normalize(mean over images of softmax(image @ keys) @ values): a unit-norm vector
  (no temperature: CLIP's logit scale is not applied, as feizc).

The CLIP model is the one whose text tower is the diffusion model's text encoder (SD1.5:
openai/clip-vit-large-patch14, feizc's ``./clip``), so the values are rows of the very table
the token lives in; ``method.init_clip`` names it per text encoder. ``random`` (tiny and arch
models, whose weights are random anyway): the model's own text encoder as the text tower, a
seeded random projection and a small random vision tower. SDXL: one vector per encoder, each
from its own CLIP and of unit norm.

Deviations: the image features are computed from the training images as loaded (center
square crop at the training resolution, in the suite's loader) resized to CLIP's input size,
where feizc's CLIPProcessor resizes the original file (shortest side) and center-crops it;
prompts are padded to the longest of each class's 80 (causal attention: the pooled feature at
the end token does not see the padding), where feizc pads to 77.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

RANDOM = "random"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's (OpenAI and LAION CLIPs)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37)
RANDOM_VISION_LAYERS = dict(num_hidden_layers=2, num_attention_heads=4)


@dataclasses.dataclass
class ClassKeys:
    """Per text encoder: the class names' sentence features (keys, C x P), their token embeddings
    (values, C x d) and the CLIP image tower that makes the queries."""

    keys: torch.Tensor
    values: torch.Tensor
    image_features: torch.nn.Module  # pixels (N, 3, S, S), CLIP-normalized -> (N, P)
    image_size: int


class _ImageTower(torch.nn.Module):
    def __init__(self, vision_model, projection):
        super().__init__()
        self.vision_model, self.projection = vision_model, projection

    def forward(self, pixels):
        return self.projection(self.vision_model(pixel_values=pixels).pooler_output)


def _clip_towers(source: str, text_encoder, seed: int):
    """(text feature fn, image tower, image size) of the CLIP ``source`` (hub id or folder), or of
    a seeded random CLIP around ``text_encoder`` for ``random``."""
    from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel

    if source != RANDOM:
        folder = Path(source).expanduser()
        clip = CLIPModel.from_pretrained(str(folder) if folder.is_dir() else source).float().eval()  # fp32
        clip.to(text_encoder.device)
        text = lambda ids: clip.text_projection(clip.text_model(input_ids=ids).pooler_output)  # noqa: E731
        image_tower = _ImageTower(clip.vision_model, clip.visual_projection)
        return text, image_tower, clip.config.vision_config.image_size
    hidden = text_encoder.config.hidden_size
    own_projection = getattr(text_encoder, "text_projection", None)  # SDXL's second encoder has one
    features = own_projection.out_features if own_projection is not None else hidden
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = torch.nn.Linear(hidden, hidden, bias=False)
        config = CLIPVisionConfig(**RANDOM_VISION, **RANDOM_VISION_LAYERS)
        vision = CLIPVisionModel(config).eval()
        image_tower = _ImageTower(vision, torch.nn.Linear(config.hidden_size, features, bias=False))
    projection.to(text_encoder.device)

    def text(ids):
        out = text_encoder(input_ids=ids)
        if own_projection is not None:
            return out.text_embeds.float()
        return projection(out.pooler_output.float())

    return text, image_tower, config.image_size


def imagenet_classes() -> tuple[list[str], list]:
    """feizc's class names and sentence templates: open_clip's lists, the same strings."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    return list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES)


@torch.no_grad()
def class_keys(tokenizer, text_encoder, source: str, seed: int = 0, chunk: int = 4000) -> ClassKeys:
    """The keys and values of the cross-attention for one text encoder (before it is quantized:
    a random CLIP uses it as its text tower). ``text_encoder``'s table gives the values."""
    names, templates = imagenet_classes()
    text, image_tower, image_size = _clip_towers(source, text_encoder, seed)
    device = text_encoder.device
    image_tower.to(device)
    prompts = [template(name) for name in names for template in templates]
    ids = tokenizer(prompts, padding="longest", truncation=True, return_tensors="pt").input_ids
    features = torch.cat([F.normalize(text(part.to(device)).float(), dim=-1) for part in ids.split(chunk)])
    keys = features.view(len(names), len(templates), -1).mean(dim=1)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    table = text_encoder.get_input_embeddings().weight.detach()
    name_ids = [tokenizer.encode(name, add_special_tokens=False) for name in names]
    values = [table[torch.tensor(ids, device=device)].float().mean(dim=0) for ids in name_ids]
    return ClassKeys(keys, torch.stack(values), image_tower, image_size)


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """Training images (N, 3, H, W in [-1, 1]) as CLIP's input: size x size, bicubic, normalized."""
    pixels = F.interpolate((images.float() + 1) / 2, size=(size, size), mode="bicubic", antialias=True)
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=pixels.device)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD, device=pixels.device)[:, None, None]
    return (pixels.clamp(0, 1) - mean) / std


@torch.no_grad()
def cross_attention_token(keys: ClassKeys, images: torch.Tensor) -> torch.Tensor:
    """feizc's ``image_condition_embed_initialize``: the unit-norm initial token (d,)."""
    pixels = clip_pixels(images, keys.image_size).to(keys.keys.device)
    queries = F.normalize(keys.image_features(pixels).float(), dim=-1)  # (N, P)
    attention = torch.softmax(queries @ keys.keys.T, dim=-1)  # (N, C): one row per image
    token = (attention @ keys.values).mean(dim=0)
    return token / token.norm()

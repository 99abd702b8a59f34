"""Image-quality metrics of the ZOODiP and DreamBooth papers: CLIP-T, CLIP-I, DINO, DINO-inter.

- CLIP-T: cosine between the CLIP embedding of the prompt (placeholder removed; the caller passes
  that text) and of the image generated from it, averaged over images.
- CLIP-I / DINO: mean cosine over all (generated, real) pairs of CLIP / DINO-CLS image embeddings.
- DINO-inter: mean cosine over the unordered pairs i < j of images generated from one prompt
  (lower = more diverse), averaged over prompts.

Models come from ``eval_cfg.clip`` / ``eval_cfg.dino`` (``conf/eval/*.yaml``), field ``source``:
``open_clip`` / ``timm`` load published weights (a local ``checkpoint`` file, the Hugging Face cache,
or the Hub); ``random`` builds tiny seeded random models for tests and smoke runs.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image


@dataclass
class Scores:
    clip_t: float | None
    clip_i: float
    dino: float
    dino_inter: float | None
    n_images: int
    per_image: dict[str, list[float] | None] | None = None  # clip_t, clip_i, dino of each generated image


class MetricModelsUnavailable(RuntimeError):
    """The CLIP or DINO weights cannot be loaded (no checkpoint file, no network, no cache)."""


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor, exclude_diagonal: bool = False) -> float:
    """Mean of a_i . b_j over all pairs (rows are L2-normalised features).

    ``exclude_diagonal`` (a and b the same set): skip the self pairs i == j. The mean over the
    ordered pairs i != j equals the mean over the unordered pairs i < j, the matrix being symmetric.
    """
    sim = a.double() @ b.double().T
    if not exclude_diagonal:
        return sim.mean().item()
    n = sim.shape[0]
    if sim.shape != (n, n) or n < 2:
        raise ValueError(f"exclude_diagonal needs one set of at least 2 features, got {tuple(sim.shape)}")
    return ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()


def check_weights_available(eval_cfg, metric: str | None = None) -> None:
    """Locate (fetching once if the Hub is reachable) the metric weights, CLIP's and DINO's or
    the one ``metric`` names, or raise MetricModelsUnavailable at once: a run checks this before
    it trains."""
    if metric in (None, "clip") and eval_cfg.clip.source == "open_clip":
        _clip_weights(eval_cfg.clip)
    if metric in (None, "dino") and eval_cfg.dino.source == "timm":
        _dino_weights(eval_cfg.dino)


class Scorer:
    def __init__(self, eval_cfg, device="cpu"):
        self.device = torch.device(device)
        self.batch_size = int(eval_cfg.batch_size)
        clip_cfg, dino_cfg = eval_cfg.clip, eval_cfg.dino
        # fail fast: find both weight files before building anything
        clip_file = _clip_weights(clip_cfg) if clip_cfg.source == "open_clip" else None
        dino_file = _dino_weights(dino_cfg) if dino_cfg.source == "timm" else None
        self.clip, self.clip_preprocess, self.tokenizer = _build_clip(clip_cfg, clip_file)
        self.dino, self.dino_preprocess = _build_dino(dino_cfg, dino_file)
        for model in (self.clip, self.dino):
            model.requires_grad_(False).eval().to(self.device, torch.float32)

    # -- features (L2-normalised rows, computed in batches of eval_cfg.batch_size) --

    def clip_image_features(self, images: list[Image.Image]) -> torch.Tensor:
        return self._embed(
            images, lambda batch: self.clip.encode_image(self._pixels(batch, self.clip_preprocess))
        )

    def clip_text_features(self, texts: list[str]) -> torch.Tensor:
        return self._embed(texts, lambda batch: self.clip.encode_text(self.tokenizer(batch).to(self.device)))

    def dino_features(self, images: list[Image.Image]) -> torch.Tensor:
        return self._embed(images, lambda batch: self.dino(self._pixels(batch, self.dino_preprocess)))

    def _pixels(self, images, preprocess) -> torch.Tensor:
        return torch.stack([preprocess(im.convert("RGB")) for im in images]).to(self.device)

    @torch.inference_mode()
    def _embed(self, items: list, encode) -> torch.Tensor:
        if not items:
            raise ValueError("nothing to embed")
        chunks = [encode(list(items[i : i + self.batch_size])) for i in range(0, len(items), self.batch_size)]
        return F.normalize(torch.cat(chunks).float(), dim=-1).cpu()

    # -- scores --

    def score(self, generated, texts, real, inter_groups=None) -> Scores:
        """texts[i]: the prompt of generated[i], placeholder removed; inter_groups: images of one prompt."""
        if texts is not None and len(texts) != len(generated):
            raise ValueError(f"{len(texts)} texts for {len(generated)} generated images")
        gen_clip, real_clip = self.clip_image_features(generated), self.clip_image_features(real)
        clip_t = per_image_clip_t = None
        if texts is not None:
            per_image_clip_t = (self.clip_text_features(texts).double() * gen_clip.double()).sum(-1)
            clip_t = per_image_clip_t.mean().item()
        gen_dino, real_dino = self.dino_features(generated), self.dino_features(real)
        dino_inter = None
        if inter_groups:
            groups = [self.dino_features(group) for group in inter_groups]
            per_group = [mean_pairwise_cosine(f, f, exclude_diagonal=True) for f in groups]
            dino_inter = sum(per_group) / len(per_group)
        return Scores(
            clip_t=clip_t,
            clip_i=mean_pairwise_cosine(gen_clip, real_clip),
            dino=mean_pairwise_cosine(gen_dino, real_dino),
            dino_inter=dino_inter,
            n_images=len(generated),
            per_image={  # the gallery's per-image scores; their means are the scores above
                "clip_t": None if per_image_clip_t is None else per_image_clip_t.tolist(),
                "clip_i": (gen_clip.double() @ real_clip.double().T).mean(1).tolist(),
                "dino": (gen_dino.double() @ real_dino.double().T).mean(1).tolist(),
            },
        )

    def score_real(self, real) -> Scores:
        """The upper-bound row: real images against each other, self pairs excluded."""
        clip, dino = self.clip_image_features(real), self.dino_features(real)
        return Scores(
            clip_t=None,
            clip_i=mean_pairwise_cosine(clip, clip, exclude_diagonal=True),
            dino=mean_pairwise_cosine(dino, dino, exclude_diagonal=True),
            dino_inter=None,
            n_images=len(real),
        )


# -- model building --


def _build_clip(cfg, weights: str | None):
    import open_clip  # here, not at the top: validation must not wait for it

    if cfg.source == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = open_clip.CLIP(**OmegaConf.to_container(cfg.model_cfg, resolve=True))
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    elif cfg.source == "open_clip":
        tag = open_clip.get_pretrained_cfg(cfg.arch, cfg.pretrained) or {}
        # A file path carries no tag settings: pass the tag's own (OpenAI weights need QuickGELU).
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.arch,
            pretrained=weights,
            force_quick_gelu=tag.get("quick_gelu", False),
            image_mean=tag.get("mean"),
            image_std=tag.get("std"),
            image_interpolation=tag.get("interpolation"),
            image_resize_mode=tag.get("resize_mode"),
        )
    else:
        raise ValueError(f"eval.clip.source={cfg.source!r}: expected open_clip or random")
    return model, preprocess, open_clip.get_tokenizer(cfg.arch)


def _build_dino(cfg, weights: str | None):
    import timm
    from timm.data import create_transform, resolve_data_config

    # features = the CLS token after the final norm
    kwargs = dict(num_classes=0, global_pool="token", img_size=cfg.image_size)
    if cfg.source == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            kwargs.update(OmegaConf.to_container(cfg.model_kwargs))
            model = timm.create_model(cfg.arch, pretrained=False, **kwargs)
    elif cfg.source == "timm":
        overlay = dict(file=weights)  # the file found by _dino_weights
        model = timm.create_model(cfg.arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    else:
        raise ValueError(f"eval.dino.source={cfg.source!r}: expected timm or random")
    size = (3, cfg.image_size, cfg.image_size)
    return model, create_transform(**resolve_data_config({"input_size": size}, model=model))


# -- finding weight files without long network retries --


def _clip_weights(cfg) -> str:
    import open_clip

    what = f"CLIP {cfg.arch} ({cfg.pretrained})"
    if cfg.checkpoint:
        return _local_file(cfg.checkpoint, what, "eval.clip.checkpoint")
    tag = open_clip.get_pretrained_cfg(cfg.arch, cfg.pretrained)
    if not tag or not tag.get("hf_hub"):
        raise MetricModelsUnavailable(f"{what}: no open_clip Hub weights; pass eval.clip.checkpoint=<file>")
    # "org/name/file" or "org/name/" (open_clip's default file names)
    repo, filename = os.path.split(tag["hf_hub"])
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return _hub_file(repo, names, what, "eval.clip.checkpoint")


def _dino_weights(cfg) -> str:
    import timm

    what = f"DINO {cfg.arch}"
    if cfg.checkpoint:
        return _local_file(cfg.checkpoint, what, "eval.dino.checkpoint")
    pretrained = timm.models.get_pretrained_cfg(cfg.arch)
    if pretrained is None or not pretrained.hf_hub_id:
        raise MetricModelsUnavailable(f"{what}: no timm Hub weights; pass eval.dino.checkpoint=<file>")
    names = ["model.safetensors", "pytorch_model.bin"]
    return _hub_file(pretrained.hf_hub_id, names, what, "eval.dino.checkpoint")


def _local_file(path, what: str, key: str) -> str:
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise MetricModelsUnavailable(f"{what}: {key}={str(path)!r} is not a file")
    return str(file)


def _hub_file(repo: str, names: list[str], what: str, key: str) -> str:
    """The first of ``names`` in the Hub repo, from the cache alone when the Hub is out of reach."""
    from huggingface_hub import hf_hub_download

    offline = not _hub_reachable()
    error = None
    for name in names:
        try:
            return hf_hub_download(repo, name, local_files_only=offline)
        except Exception as e:  # any failure means "not obtainable here"
            error = e
    where = "not in the Hugging Face cache and the Hub is unreachable" if offline else type(error).__name__
    raise MetricModelsUnavailable(
        f"{what} weights unavailable ({where}); download it once "
        f"(`hf download {repo} {names[0]}`) and pass {key}=<file>"
    ) from error


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy only the Hub client can tell
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout).close()
    except OSError:
        return False
    return True

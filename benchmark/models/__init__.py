"""The model under personalization: Stable Diffusion 1.5, 2.1 or XL, or a stand-in with its
architecture.

Three kinds (``conf/model/*.yaml``, field ``kind``) of three families (field ``family``: sd1,
sd2, sdxl; ``benchmark.models.families``; the offline CLIP tokenizer is ``benchmark.models.tokenizer``):

- ``hub``:  the real weights, from ``model.path`` (a local diffusers folder) or the Hub.
- ``tiny``: a few-MB model of the family with deterministic random weights (tests, smoke runs).
- ``arch``: the family's exact architecture with random weights (memory/timing without a download).

Every kind gives the same :class:`Components`, frozen and in eval mode; methods unfreeze what
they train. SDXL adds a second tokenizer and text encoder (``tokenizer_2``, ``text_encoder_2``).
``build_pipeline`` wraps components in the family's stock diffusers pipeline.

diffusers and transformers are imported where a model is built, not here: validation
(``locate_weights``) must answer before those libraries have loaded.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily

from benchmark.models import families

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

KINDS = ("hub", "tiny", "arch")
SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
SDXL_SUBFOLDERS = ("tokenizer_2", "text_encoder_2")

# SD1.5's published configs (stable-diffusion-v1-5/stable-diffusion-v1-5, */config.json).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT_ENCODER = dict(  # CLIP ViT-L/14's text tower, as SD1.5's text_encoder/config.json
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    bos_token_id=0,  # SD1.5's (legacy) values; the tokenizer's are 49406/49407
    pad_token_id=1,
    eos_token_id=2,
)
# The training scheduler of SD1.5 (its scheduler_config.json, read as a DDPMScheduler).
SD15_NOISE_SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)
# The tiny model's defaults; conf/model/tiny.yaml may override any of them.
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_VAE = dict(
    block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8
)  # 4 blocks: 8x down
TINY_TEXT_ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


class WeightsUnavailable(RuntimeError):
    """The real weights cannot be loaded (no local folder, no network, no cache)."""


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler  # the training scheduler
    device: torch.device
    dtype: torch.dtype  # the weight dtype the model was loaded in
    tokenizer_2: CLIPTokenizer | None = None  # SDXL only
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL only

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    def to(self, device) -> Components:
        self.device = torch.device(device)
        for module in (*self.text_encoders, self.vae, self.unet):
            module.to(self.device)
        return self

    def pipeline(self):
        """The family's stock diffusers pipeline over these modules (:func:`build_pipeline`)."""
        return build_pipeline(self)


class Networks(NamedTuple):
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL only


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _plain(value: Any) -> Any:
    """OmegaConf lists/dicts -> tuples/dicts that diffusers' configs accept."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return value
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    return tuple(_plain(v) for v in value)


def _overrides(cfg: Any, key: str, defaults: dict) -> dict:
    section = _get(cfg, key)
    return {**defaults, **({k: _plain(v) for k, v in section.items()} if section else {})}


def family(model_cfg) -> str:
    name = _get(model_cfg, "family", "sd1")
    if name not in families.FAMILIES:
        raise ValueError(f"model.family={name!r} is not known; choose one of {', '.join(families.FAMILIES)}")
    return name


def _kind(model_cfg) -> str:
    kind = _get(model_cfg, "kind")
    if kind not in KINDS:
        raise ValueError(f"model.kind={kind!r} is not known; choose one of {', '.join(KINDS)}")
    return kind


def _freeze(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast, even a harmless one.
        torch.nn.Module.to(module, dtype=dtype)
    return module.eval().requires_grad_(False)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_from_config(model_cfg, dtype: torch.dtype = torch.float32) -> Networks:
    """The random-weight networks of a ``tiny`` or ``arch`` model; no I/O, so it also runs
    under ``FakeTensorMode``. Each network is initialised after ``torch.manual_seed(init_seed)``:
    the same config always gives bit-identical weights. The global RNG is left as it was."""
    if _kind(model_cfg) == "hub":
        raise ValueError("model.kind=hub has real weights; use load_components, not build_from_config")
    fake_mode = detect_fake_mode()
    if fake_mode is None:  # real weights are drawn in fp32 and then rounded: every dtype holds one model
        return _build(model_cfg, torch.float32, dtype)
    # Fake tensors (memory prediction) have no values: build on the meta device in ``dtype``, where
    # no initialisation kernel runs (a third of the ops of a fake build), then make each tensor fake.
    with unset_fake_temporarily(), torch.device("meta"):
        networks = _build(model_cfg, dtype, dtype)
    return Networks(*(None if m is None else _as_fake(m, fake_mode) for m in networks))


def _as_fake(module: torch.nn.Module, fake_mode) -> torch.nn.Module:
    """``module`` with its meta parameters and buffers replaced by fake CPU tensors (the same
    storages: a memory tracker that saw them created keeps counting them)."""
    cpu, fakes = torch.device("cpu"), {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in fakes:  # shared (tied) tensors stay shared
            fakes[id(t)] = fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, t, cpu)
        return fakes[id(t)]

    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = fake(b)
    return module


def _build(model_cfg, build_dtype: torch.dtype, dtype: torch.dtype) -> Networks:
    """The networks drawn in ``build_dtype``, then cast to ``dtype`` and frozen."""
    kind = _kind(model_cfg)
    seed = int(_get(model_cfg, "init_seed", 0))
    resolution = int(_get(model_cfg, "resolution", 64 if kind == "tiny" else 512))
    unet_kw, vae_kw, text_kw, text_2_kw = _architecture(model_cfg, kind, family(model_cfg))
    unet_kw["sample_size"] = resolution // 8
    vae_kw["sample_size"] = resolution

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_encoder_2 = None
    with torch.random.fork_rng(devices=[]), _default_dtype(build_dtype):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_kw))
        if text_2_kw is not None:
            torch.manual_seed(seed)
            text_encoder_2 = _freeze(CLIPTextModelWithProjection(CLIPTextConfig(**text_2_kw)), dtype)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_kw)
        set_posterior_logvar(vae, _get(model_cfg, "vae_posterior_logvar"))
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_kw)
    return Networks(_freeze(text_encoder, dtype), _freeze(vae, dtype), _freeze(unet, dtype), text_encoder_2)


def set_posterior_logvar(vae, logvar: float | None) -> None:
    """A random VAE's posterior has log-variance ~0: its samples are noise around a mean of std
    ~0.25 (tiny model, real photos), so the images hardly reach the latents. A fixed ``logvar``
    (the log-variance half of ``quant_conv``: weights 0, bias ``logvar``) makes the posterior
    nearly deterministic, as a trained SD VAE's; None leaves the random one."""
    if logvar is None:
        return
    channels = vae.quant_conv.out_channels // 2
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = float(logvar)


def _architecture(model_cfg, kind: str, name: str) -> tuple[dict, dict, dict, dict | None]:
    """The (unet, vae, text_encoder, text_encoder_2 or None) configs of a tiny or arch model."""
    text_2_kw = None
    if kind == "arch":
        unet_kw, vae_kw, text_kw = dict(SD15_UNET), dict(SD15_VAE), dict(SD15_TEXT_ENCODER)
        if name == "sd2":
            unet_kw, text_kw = dict(families.SD21_UNET), {**text_kw, **families.SD21_TEXT_ENCODER}
        elif name == "sdxl":
            unet_kw, vae_kw = dict(families.SDXL_UNET), {**vae_kw, **families.SDXL_VAE}
            text_2_kw = {**SD15_TEXT_ENCODER, **families.SDXL_TEXT_ENCODER_2}
        return unet_kw, vae_kw, text_kw, text_2_kw
    tiny_ids = {"bos_token_id": 49406, "pad_token_id": 49407, "eos_token_id": 49407}  # the tokenizer's
    unet_kw = _overrides(model_cfg, "unet", {**TINY_UNET, **families.TINY_UNET[name]})
    vae_kw = {**SD15_VAE, **_overrides(model_cfg, "vae", TINY_VAE)}
    text_kw = {
        **SD15_TEXT_ENCODER, **tiny_ids,
        **_overrides(model_cfg, "text_encoder", {**TINY_TEXT_ENCODER, **families.TINY_TEXT_ENCODER[name]}),
    }  # fmt: skip
    text_kw["projection_dim"] = text_kw["hidden_size"]  # unused by CLIPTextModel
    if name == "sdxl":
        vae_kw.update(families.SDXL_VAE)
        text_2_kw = {
            **SD15_TEXT_ENCODER, **tiny_ids,
            **_overrides(model_cfg, "text_encoder_2", families.TINY_TEXT_ENCODER_2),
        }  # fmt: skip
        unet_kw = families.sdxl_unet_dims(unet_kw, text_kw, text_2_kw)
    return unet_kw, vae_kw, text_kw, text_2_kw


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from huggingface_hub.errors import EntryNotFoundError

        errors.append(EntryNotFoundError)
    except ImportError:  # older huggingface_hub: its errors are OSErrors
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub opens (False in HF_HUB_OFFLINE mode)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy only the Hub client can tell
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout
        ).close()
    except OSError:
        return False
    return True


def locate_weights(model_cfg) -> tuple[str, dict]:
    """Where a hub-kind model loads from: (model.path or hub id, from_pretrained kwargs). Raises
    WeightsUnavailable at once (one line, saying how to get them) if neither can serve."""
    path, hub_id, revision = _get(model_cfg, "path"), _get(model_cfg, "hub_id"), _get(model_cfg, "revision")
    if path:
        folder = Path(str(path)).expanduser()
        subfolders = SUBFOLDERS + (SDXL_SUBFOLDERS if family(model_cfg) == "sdxl" else ())
        missing = [n for n in ("model_index.json", *subfolders) if not (folder / n).exists()]
        if missing:
            raise WeightsUnavailable(
                f"model.path={str(path)!r} is not a diffusers Stable Diffusion folder "
                f"(expected model_index.json and {', '.join(s + '/' for s in subfolders)}; "
                f"missing {', '.join(missing)})"
            )
        return str(folder), {}
    # without a network, use the Hub cache alone (no 20 s of retries)
    kwargs = {"revision": revision, "local_files_only": not _hub_reachable()}
    try:  # one small file tells whether the Hub or its cache can serve us
        from huggingface_hub import hf_hub_download

        hf_hub_download(str(hub_id), "model_index.json", **kwargs)
    except _hub_errors() as e:
        raise _hub_unavailable(str(hub_id), e) from e
    return str(hub_id), kwargs


def locate_clip(source: str) -> str:
    """Check that a CLIP model (``random``, a local folder or a hub id) can load; raises
    WeightsUnavailable at once (one line, saying how to get it) otherwise. GF-TI's init."""
    if source == "random":
        return source
    folder = Path(source).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise WeightsUnavailable(f"CLIP folder {source!r} has no config.json: pass a CLIPModel folder")
        return str(folder)
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(source, "config.json", local_files_only=not _hub_reachable())
    except _hub_errors() as e:
        raise WeightsUnavailable(
            f"cannot load the CLIP model {source!r} (no network/cache: {type(e).__name__}); download it once "
            f"with `hf download {source} config.json model.safetensors --local-dir <dir>` and pass "
            "model.text_encoder_clip=[<dir>], or use method.init=initializer"
        ) from e
    return source


def _hub_unavailable(source: str, e: BaseException) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"cannot load Stable Diffusion weights {source!r} (no network/cache: {type(e).__name__}); "
        f"download them once with `hf download {source} --include 'model_index.json' '*/*.json' "
        "'*/*.txt' 'text_encoder/model.safetensors' '*/diffusion_pytorch_model.safetensors' "
        "--local-dir <dir>` and pass model.path=<local diffusers folder>"
    )


def _load_hub(model_cfg, dtype: torch.dtype) -> tuple[list[CLIPTokenizer], Networks, DDPMScheduler]:
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source, kwargs = locate_weights(model_cfg)
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)]
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", **{dtype_kw: dtype}, **kwargs
        )
        text_encoder_2 = None
        if family(model_cfg) == "sdxl":
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs))
            text_encoder_2 = _freeze(
                CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", **{dtype_kw: dtype}, **kwargs
                ),
                dtype,
            )
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kwargs)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    except _hub_errors() as e:
        if _get(model_cfg, "path"):
            raise WeightsUnavailable(
                f"cannot load Stable Diffusion weights from model.path={source!r} ({type(e).__name__})"
            ) from e
        raise _hub_unavailable(source, e) from e
    networks = Networks(
        _freeze(text_encoder, dtype), _freeze(vae, dtype), _freeze(unet, dtype), text_encoder_2
    )
    return tokenizers, networks, scheduler


def load_components(model_cfg, device="cpu", dtype: torch.dtype = torch.float32) -> Components:
    """Fresh components with the model's original weights, frozen, eval mode, on ``device``."""
    kind = _kind(model_cfg)
    if kind == "hub":
        tokenizers, networks, noise_scheduler = _load_hub(model_cfg, dtype)
    else:
        from diffusers import DDPMScheduler

        from benchmark.models.tokenizer import clip_tokenizer

        networks = build_from_config(model_cfg, dtype)
        tokenizers = [clip_tokenizer() for _ in range(1 + (networks.text_encoder_2 is not None))]
        noise_scheduler = DDPMScheduler(
            **{
                **SD15_NOISE_SCHEDULER,
                "prediction_type": families.PREDICTION_TYPE[family(model_cfg)],
                "num_train_timesteps": int(_get(model_cfg, "num_train_timesteps", 1000)),
            }
        )
    if family(model_cfg) != "sdxl":  # their stock pipelines never upcast the VAE: nor does training
        networks.vae.register_to_config(force_upcast=False)  # (methods.common.diffusion.vae_in_fp32)
    components = Components(
        tokenizer=tokenizers[0], text_encoder=networks.text_encoder, vae=networks.vae, unet=networks.unet,
        noise_scheduler=noise_scheduler, device=torch.device(device), dtype=dtype,
        tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None, text_encoder_2=networks.text_encoder_2,
    )  # fmt: skip
    return components.to(device)


def build_pipeline(components: Components):
    """The family's stock pipeline sharing ``components``' modules, with its Hub repo's default
    sampler (SD1.5: PNDM, SD2.1: DDIM, SDXL: Euler) over the training scheduler's betas."""
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sdxl = components.text_encoder_2 is not None
    prediction = components.noise_scheduler.config.prediction_type
    name = families.INFERENCE_SCHEDULER["sdxl" if sdxl else "sd2" if prediction == "v_prediction" else "sd1"]
    extra = {"skip_prk_steps": True} if name == "PNDMScheduler" else {"timestep_spacing": "leading"}
    if name != "EulerDiscreteScheduler":
        extra["set_alpha_to_one"] = False
    scheduler = getattr(diffusers, name).from_config(components.noise_scheduler.config, **extra)
    if sdxl:
        pipeline = StableDiffusionXLPipeline(
            vae=components.vae, unet=components.unet, scheduler=scheduler,
            text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2,
        )  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)
        return pipeline
    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def cast_pipeline(pipeline, dtype: torch.dtype):
    """Cast every floating tensor of the pipeline's networks to ``dtype``; integer tensors
    (quantized codes, zero points) stay as they are."""
    encoder_2 = getattr(pipeline, "text_encoder_2", None)  # SDXL
    for module in (pipeline.text_encoder, pipeline.vae, pipeline.unet, *([encoder_2] if encoder_2 else [])):
        _freeze(module, dtype)
    return pipeline


def load_pipeline(model_cfg, device="cpu", dtype: torch.dtype = torch.float32):
    """A pipeline with the original (unpersonalized) weights."""
    return build_pipeline(load_components(model_cfg, device, dtype))

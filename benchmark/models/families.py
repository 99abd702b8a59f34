"""The architectures beyond SD1.5: SD2.1 (768 px, v-prediction, OpenCLIP ViT-H text encoder)
and SDXL base 1.0 (1024 px, two text encoders, pooled-text and size conditioning).

``family`` (``conf/model/*.yaml``) is ``sd1``, ``sd2`` or ``sdxl``. Each family has its
published configs (for ``kind: arch``: the real architecture with random weights), a tiny
variant (``kind: tiny``: the same family's features at a few MB) and its stock inference
scheduler. The values are those of the Hub repos' ``*/config.json``:
stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0.
"""

from __future__ import annotations

FAMILIES = ("sd1", "sd2", "sdxl")
# the SDXL U-Net's size conditioning: (original h, w, crop top, left, target h, w)
SDXL_TIME_IDS = 6

_SD_BLOCKS = dict(
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
)
SD21_UNET = dict(
    _SD_BLOCKS,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
)
SD21_TEXT_ENCODER = dict(  # OpenCLIP ViT-H/14's text tower, its penultimate layer (23 of 24)
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=512,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
)
SDXL_UNET = dict(
    _SD_BLOCKS,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG)
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 x 256 size embedding
)
SDXL_TEXT_ENCODER_2 = dict(  # OpenCLIP ViT-bigG/14's text tower, with its text projection
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
)
# SDXL's VAE: SD's architecture, another latent scale; fp16 overflows in it (force_upcast)
SDXL_VAE = dict(scaling_factor=0.13025, force_upcast=True)
# Training schedulers (DDPM over the Hub scheduler_config's betas): all scaled_linear 0.00085-0.012
PREDICTION_TYPE = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}
# The stock inference scheduler of each family's Hub repo (scheduler/scheduler_config.json)
INFERENCE_SCHEDULER = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler"}

# Tiny variants: the tiny SD1 model plus what makes the family (conf/model/tiny_*.yaml may override)
TINY_UNET = {
    "sd1": {},
    "sd2": dict(use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
    ),
}
TINY_TEXT_ENCODER = {"sd1": {}, "sd2": dict(hidden_act="gelu"), "sdxl": {}}
TINY_TEXT_ENCODER_2 = dict(
    hidden_size=48, intermediate_size=37, projection_dim=48, num_hidden_layers=2, num_attention_heads=4,
    hidden_act="gelu",
)  # fmt: skip


def sdxl_unet_dims(unet_kw: dict, text_kw: dict, text_2_kw: dict) -> dict:
    """The SDXL U-Net's input sizes that follow from its text encoders: cross-attention on both
    encoders' hidden states side by side, the added embedding on the pooled projection + size ids."""
    return {
        **unet_kw,
        "cross_attention_dim": text_kw["hidden_size"] + text_2_kw["hidden_size"],
        "projection_class_embeddings_input_dim": text_2_kw["projection_dim"]
        + SDXL_TIME_IDS * unet_kw["addition_time_embed_dim"],
    }

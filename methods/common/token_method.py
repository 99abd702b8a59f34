"""Shared by the methods that learn one new token (TI, GF-TI, ZOODiP): the token is added to
the vocabulary, prompts name the subject by the token alone, and the artifact is a diffusers
textual-inversion file that `load_textual_inversion` reads: {token: (1, dim)} for SD1/SD2.

SDXL has two text encoders: the token gets a row in each (768 + 1280 dims), and the methods see
the two rows as one vector, concatenated (``TokenRows``): TI trains both rows, GF-TI and ZOODiP
search the 2048-d vector. The artifact is the two-embedding file of diffusers' SDXL textual
inversion ({"clip_l": (1, 768), "clip_g": (1, 1280)}), loaded into each encoder."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from methods.common.base import TOKEN_TEACHER, ConfigError, DataConfig, Method, MethodConfig, require
from methods.common.conditioning import prompt_ids
from methods.common.diffusion import encode_latents, noisy_latents
from methods.common.latent_cache import LatentCache, release_weights
from methods.common.prompts import IMAGENET_TEMPLATES_SMALL, sample_prompts
from methods.common.timesteps import check_timestep_bounds, sample_timesteps


def add_placeholder_token(tokenizer, text_encoder, token: str, initializer_words: str) -> int:
    """Add ``token`` to the vocabulary, initialised to the mean embedding of ``initializer_words``
    (the diffusers example requires one initializer token; a multi-token class noun such as
    "stuffed animal" uses the mean of its tokens). Returns the new token id."""
    existing_word = len(tokenizer.encode(token, add_special_tokens=False)) == 1
    if existing_word or tokenizer.add_tokens(token) != 1:
        raise ConfigError(
            f"placeholder token {token!r} is already in the tokenizer's vocabulary; "
            "pass a new one, e.g. method.placeholder_token='<my-subject>'"
        )
    init_ids = tokenizer.encode(initializer_words, add_special_tokens=False)
    require(len(init_ids) > 0, f"initializer {initializer_words!r} encodes to no token")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    token_id = tokenizer.convert_tokens_to_ids(token)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = weight[init_ids].mean(dim=0)
    return token_id


SDXL_KEYS = ("clip_l", "clip_g")  # diffusers' SDXL textual-inversion file: one row per encoder


class TokenRows:
    """The new token's input-embedding row in each text encoder, seen as one vector (the rows
    concatenated in encoder order). ``weights`` are the embedding matrices (frozen);
    ``token_ids`` the token's rows in them, ``vocabulary_ids`` its ids in the tokenizers (the
    same unless the vocabulary is compacted)."""

    def __init__(self, text_encoders, token_ids: list[int], vocabulary_ids: list[int] | None = None):
        self.encoders = list(text_encoders)
        self.weights = [e.get_input_embeddings().weight for e in self.encoders]
        self.token_ids = token_ids
        self.vocabulary_ids = list(token_ids if vocabulary_ids is None else vocabulary_ids)
        self.dims = [w.shape[1] for w in self.weights]

    @contextlib.contextmanager
    def substituted(self, vectors: torch.Tensor) -> Iterator[None]:
        """While inside, prompt i embeds the token as ``vectors[i]`` (prompts x the
        concatenated dims), each encoder its part (``token_rows``)."""
        with contextlib.ExitStack() as stack:
            parts = vectors.split(self.dims, dim=1)
            for encoder, token_id, part in zip(self.encoders, self.vocabulary_ids, parts):
                stack.enter_context(token_rows(encoder, token_id, part))
            yield

    def read(self) -> torch.Tensor:
        return torch.cat([w[i].detach() for w, i in zip(self.weights, self.token_ids)])

    @torch.no_grad()
    def write(self, vector: torch.Tensor) -> None:
        for w, i, row in zip(self.weights, self.token_ids, vector.split(self.dims)):
            w[i] = row.to(w.dtype)

    def artifact(self, token: str) -> dict[str, torch.Tensor]:
        rows = [w[i : i + 1].detach().clone() for w, i in zip(self.weights, self.token_ids)]
        return {token: rows[0]} if len(rows) == 1 else dict(zip(SDXL_KEYS, rows))


def load_token(pipeline, artifact: dict[str, torch.Tensor], token: str) -> None:
    """Load a textual-inversion artifact into a stock SD or SDXL pipeline."""
    if SDXL_KEYS[0] not in artifact:
        pipeline.load_textual_inversion(dict(artifact), token=token)
        return
    for key, encoder, tokenizer in zip(
        SDXL_KEYS,
        (pipeline.text_encoder, pipeline.text_encoder_2),
        (pipeline.tokenizer, pipeline.tokenizer_2),
    ):
        pipeline.load_textual_inversion(artifact[key], token=token, text_encoder=encoder, tokenizer=tokenizer)


@contextlib.contextmanager
def token_rows(text_encoder, token_id: int, rows: torch.Tensor) -> Iterator[None]:
    """While inside, prompt i's ``token_id`` embeds as ``rows[i]`` (rows: prompts x dim): one
    text-encoder call scores several values of the token. The same bits as writing each value
    into the embedding row: a lookup copies the row, and so does ``torch.where``."""

    def replace(module, args, embedded):
        at_token = (args[0] == token_id)[..., None]
        return torch.where(at_token, rows[:, None, :].to(embedded.dtype), embedded)

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


class CompactEmbedding(torch.nn.Module):
    """The rows of a token-embedding matrix that the training prompts can use (``ids``, sorted
    vocabulary ids), looked up by vocabulary id: the same vectors as the full matrix, which is
    freed (SD1.5: 49,409 x 768 fp16 rows = 76 MB; the ImageNet templates use about 60)."""

    def __init__(self, weight: torch.Tensor, ids: list[int]):
        super().__init__()
        self.ids_list = sorted(set(ids))
        self.register_buffer("ids", torch.tensor(self.ids_list, device=weight.device))
        rows = weight.detach()[torch.tensor(self.ids_list, device=weight.device)].clone()
        self.weight = torch.nn.Parameter(rows, requires_grad=False)

    def row(self, token_id: int) -> int:
        return self.ids_list.index(token_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.searchsorted(self.ids, input_ids).clamp(max=len(self.ids_list) - 1)
        if detect_fake_mode() is None and not torch.equal(self.ids[rows], input_ids):
            raise ValueError("a prompt uses a token outside the compact vocabulary of the training prompts")
        return F.embedding(rows, self.weight)


def compact_vocabulary(tokenizer, text_encoder, placeholder: str) -> CompactEmbedding:
    """Replace the text encoder's token embedding by the rows the training prompts (the
    ImageNet templates with ``placeholder``, padded) can use; returns the new module."""
    prompts = [template.format(placeholder) for template in IMAGENET_TEMPLATES_SMALL]
    length = tokenizer.model_max_length  # python lists: real ids also under FakeTensorMode
    rows = tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    ids = [i for row in rows for i in row]
    compact = CompactEmbedding(text_encoder.get_input_embeddings().weight, ids)
    text_encoder.set_input_embeddings(compact)
    return compact


PRECISIONS = ("fp16", "bf16", "fp32")


MAX_TOKEN_CHARS = 32  # a new word of the tokenizer, e.g. "<sks>" or "<dog6>"
MAX_INITIALIZER_CHARS = 100


def check_placeholder_token_text(token: str) -> None:
    """One new word: printable, no spaces (a space would split it into several tokens), short."""
    shown = token if len(token) <= 40 else f"{token[:20]}...({len(token)} characters)"
    require(
        0 < len(token) <= MAX_TOKEN_CHARS and token.isprintable() and not any(c.isspace() for c in token),
        f"method.placeholder_token={shown!r}; give one new word of 1..{MAX_TOKEN_CHARS} printable "
        "characters without spaces, e.g. '<sks>'",
    )


@dataclasses.dataclass
class TokenConfig(MethodConfig):
    """Knobs every token method has; each adds its own."""

    precision: str = "fp32"
    # diffusers' textual inversion dataset: RandomHorizontalFlip(0.5), 100 repeats, shuffled
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(flip_p=0.5, repeats=100))
    placeholder_token: str = "<sks>"
    initializer: str = "class"  # the subject's class noun, or any word(s)
    timesteps: str = "uniform"
    T_L: int = 500
    T_U: int = 900
    cache_latents: bool = True  # encode the training images once; the VAE leaves training

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.precision in PRECISIONS,
            f"method.precision={self.precision!r}; choose one of: {', '.join(PRECISIONS)}",
        )
        check_placeholder_token_text(self.placeholder_token)
        require(
            0 < len(self.initializer) <= MAX_INITIALIZER_CHARS,
            f"method.initializer has {len(self.initializer)} characters; give 'class' or a few words "
            f"(at most {MAX_INITIALIZER_CHARS} characters)",
        )
        check_timestep_bounds(self.timesteps, self.T_L, self.T_U)


class TokenMethod(Method):
    """Needs ``cfg.placeholder_token`` and ``cfg.initializer`` ("class" = the subject's class noun)."""

    artifact_filename = "learned_embeds.safetensors"
    token_only_prompts = True
    teacher_kind = TOKEN_TEACHER

    def subject_phrase(self, subject) -> str:
        return self.cfg.placeholder_token

    def add_token(self, components, subject) -> int:
        """Add the token to every tokenizer and text encoder; ``self.rows`` is its rows. Returns
        its id in the first tokenizer."""
        words = subject.class_noun if self.cfg.initializer == "class" else self.cfg.initializer
        ids = [
            add_placeholder_token(tokenizer, encoder, self.cfg.placeholder_token, words)
            for tokenizer, encoder in zip(components.tokenizers, components.text_encoders)
        ]
        self.rows = TokenRows(components.text_encoders, ids)
        return ids[0]

    latent_cache: LatentCache | None = None

    def precompute(self, images, seed, steps) -> None:
        """With ``cfg.cache_latents``: the VAE posterior of every image (and its flip), then the
        VAE's weights are released (methods/common/latent_cache.py)."""
        if self.cfg.cache_latents:
            self.latent_cache = LatentCache(self.c.vae, images)
            release_weights(self.c.vae)

    def denoising_inputs(self, batch):
        """(z_t, t, target, prompt ids) of one step: latents of the batch's images, timesteps from
        ``cfg.timesteps``, noise, and ImageNet-style prompts with the token, all drawn from the
        step's generator in this order. Needs ``self.c`` (the components) set in ``setup``."""
        c, cfg, g = self.c, self.cfg, batch["generator"]
        bsz = batch["pixel_values"].shape[0]
        with torch.no_grad():
            if self.latent_cache is not None:
                latents = self.latent_cache.sample(batch, g)
            else:
                latents = encode_latents(c.vae, batch["pixel_values"], g)
            t = sample_timesteps(
                cfg.timesteps, bsz, g, c.noise_scheduler.config.num_train_timesteps, cfg.T_L, cfg.T_U,
                alphas_cumprod=c.noise_scheduler.alphas_cumprod,
            )  # fmt: skip
            z_t, target = noisy_latents(c.noise_scheduler, latents, t, g)
        ids = prompt_ids(c, self.training_prompts(batch, g))
        return z_t, t, target, ids

    def training_prompts(self, batch, generator) -> list[str]:
        """The step's prompts: one random ImageNet-style template per image, with the token."""
        return sample_prompts(self.cfg.placeholder_token, batch["pixel_values"].shape[0], generator)

    def apply(self, pipeline, artifact) -> None:
        load_token(pipeline, artifact, self.cfg.placeholder_token)

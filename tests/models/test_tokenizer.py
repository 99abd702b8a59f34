"""The offline CLIP tokenizer must tokenize exactly as OpenAI CLIP / open_clip (what SD1.5 uses)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from benchmark.models.tokenizer import clip_tokenizer, default_bpe_path

PROMPTS = [
    "a photo of a sks dog",
    "A Photo of a <dog6> in the Jungle!",
    "a dog6 wearing a red hat, on a beach at sunset.",
    "  Two   CATS,  3 dogs & 1,024 birds...  ",
    "a <sks> backpack on top of a purple rug in a forest",
    "it's a dog's life; isn't it?",
    "café au lait — naïve façade",
]


@pytest.fixture(scope="module")
def simple_tokenizer():
    """open_clip's SimpleTokenizer, loaded from its file alone (no open_clip/torchvision import)."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_under_test", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(default_bpe_path()))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


def test_special_tokens_and_sizes(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 49407
    assert tokenizer.pad_token_id == 49407  # SD1.5 pads with <|endoftext|>, not 0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_ids_as_open_clip(tokenizer, simple_tokenizer, prompt):
    ours = tokenizer(prompt).input_ids
    assert ours[0] == 49406 and ours[-1] == 49407
    assert ours[1:-1] == simple_tokenizer.encode(prompt)
    # Padded to 77 as the training/generation code calls it: content, eos, then eos padding.
    padded = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77
    assert padded[: len(ours)] == ours and set(padded[len(ours) :]) <= {49407}


def test_known_ids(tokenizer):
    # Well-known SD1.5 ids: "a"=320, "photo"=1125, "of"=539, "sks"=48136, "dog"=1929.
    assert tokenizer("a photo of a sks dog").input_ids == [49406, 320, 1125, 539, 320, 48136, 1929, 49407]


def test_truncation_keeps_eos(tokenizer):
    ids = tokenizer(" ".join(["dog"] * 100), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


def test_calls_return_independent_copies(tmp_path):
    first = clip_tokenizer(tmp_path)
    assert first.add_tokens("<zz-new-token>") == 1
    second = clip_tokenizer(tmp_path)
    assert len(second) == 49408
    assert second.add_tokens("<zz-new-token>") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]

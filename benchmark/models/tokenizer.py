"""The CLIP BPE tokenizer of Stable Diffusion 1.5, rebuilt offline.

SD1.5's tokenizer is OpenAI CLIP's byte-level BPE (vocab 49408, 77 positions, bos
``<|startoftext|>`` = 49406, eos = pad = ``<|endoftext|>`` = 49407). open_clip ships its merge
list (``bpe_simple_vocab_16e6.txt.gz``); the vocabulary is built from it exactly as open_clip's
``SimpleTokenizer`` (and OpenAI's CLIP) do, written as ``vocab.json`` / ``merges.txt`` and loaded
with :class:`transformers.CLIPTokenizer`. No network is needed.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from methods.common.atomic import write_text_atomic

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # OpenAI CLIP keeps the first 48,894 merges


def default_bpe_path() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "open_clip_torch is not installed; it ships the CLIP BPE merges the tokenizer needs"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"bpe_simple_vocab_16e6.txt.gz not found in open_clip ({spec.submodule_search_locations})"
    )


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zo-personalization-bench" / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """(token -> id, merges) as open_clip's SimpleTokenizer builds them, with HF's special tokens."""
    lines = gzip.open(bpe_path or default_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP BPE file {bpe_path} gives {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config into ``directory`` (atomically,
    only what is missing or different); returns the directory."""
    directory = Path(directory)
    vocab, merges = vocab_and_merges()
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MODEL_MAX_LENGTH,
                "do_lower_case": True,
                "errors": "replace",
                "add_prefix_space": False,
                **special,
            },
            indent=2,
        ),
    }
    for name, text in files.items():
        path = directory / name
        try:
            unchanged = path.read_text(encoding="utf-8") == text
        except (OSError, UnicodeDecodeError):
            unchanged = False
        if not unchanged:
            write_text_atomic(path, text)
    return directory


@functools.lru_cache(maxsize=4)
def _load(cache_dir: str | None) -> CLIPTokenizer:
    if cache_dir is not None:
        directory = write_tokenizer_files(cache_dir)
    else:
        try:
            directory = write_tokenizer_files(default_cache_dir())
        except OSError:  # read-only home: a private temporary folder will do
            directory = write_tokenizer_files(tempfile.mkdtemp(prefix="clip_tokenizer_"))
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer


def clip_tokenizer(cache_dir: str | Path | None = None) -> CLIPTokenizer:
    """SD1.5's CLIP tokenizer, built offline from open_clip's BPE merges.

    The loaded tokenizer is cached in-process; each call returns an independent copy, so a
    method may add tokens (Textual Inversion) without changing what the next caller gets.
    """
    tokenizer = _load(None if cache_dir is None else str(Path(cache_dir).expanduser().resolve()))
    return copy_tokenizer(tokenizer)


def shared_clip_tokenizer() -> CLIPTokenizer:
    """The in-process cached tokenizer itself, for callers that only read it (config checks):
    no copy (a third of a second each)."""
    return _load(None)


def copy_tokenizer(tokenizer: CLIPTokenizer) -> CLIPTokenizer:
    import copy

    return copy.deepcopy(tokenizer)

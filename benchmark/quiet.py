"""Quiet start: silence the third-party chatter every command used to open with, at its source,
message by message, so that a run prints our progress and results, and every other warning
(ours or a library's) still shows.

- the PyTorch profiler's C++ layer (kineto): "gpuGetDeviceCount failed" on a machine without a
  GPU and the "USDT ... profiler_start/stop" lines around every profiled step;
- torch's pytree deprecation notice for the Enum types torchao registers at import;
- diffusers' "Unable to import `torchao` Tensor objects" (a torchao version it does not know);
- transformers' note on how new token rows are initialized (diffusers' textual-inversion
  loader resizes the embeddings; the token's row is written right after);
- open_clip's INFO lines when it builds a tokenizer ("Parsing tokenizer identifier", ...);
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" and the kernels
  package's "Skipping publisher trust check" (offline, bitsandbytes uses its own CPU kernel);
- the CPU allocator's "Memory block of unknown size was allocated before the profiling started"
  on every profiled step. It is a C++ log line, so it goes with c10's log level: WARNING lines
  of torch's C++ layer are dropped (TORCH_CPP_LOG_LEVEL=ERROR unless the environment sets it);
  torch's warnings raised while Python code runs are Python warnings and still show.

Called from benchmark/__init__.py, so it runs before torch is imported by any entry point.
"""

from __future__ import annotations

import logging
import os

# kineto's log levels: 0 verbose ... 4 error, 5 its USDT trace lines; 6 keeps it silent
KINETO_SILENT = "6"

# (logger name, a fragment of the message's format string) of each notice that is dropped
NOTICES = (
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
    # diffusers' load_textual_inversion resizes without mean_resizing=False; our token row is then set
    ("transformers.modeling_utils", "The new embeddings will be initialized from a multivariate normal"),
    ("root", "Parsing tokenizer identifier"),  # open_clip logs to the root logger
    ("root", "Using default SimpleTokenizer"),
    ("root", "Attempting to load config from built-in"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check"),
)


class DropNotices(logging.Filter):
    """Drop the records of ``NOTICES`` logged on this logger; keep everything else."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in str(record.msg) for fragment in self.fragments)


def silence_third_party_notices() -> None:
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_SILENT)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, fragment in NOTICES:
        by_logger[name] = by_logger.get(name, ()) + (fragment,)
    for name, fragments in by_logger.items():
        logger = logging.getLogger() if name == "root" else logging.getLogger(name)
        if not any(isinstance(f, DropNotices) for f in logger.filters):
            logger.addFilter(DropNotices(fragments))

"""Benchmark harness for memory-efficient personalization of text-to-image diffusion models.

Importing it first silences known third-party start-up notices (benchmark.quiet) and defers
optional backends to their first use (benchmark.lazy_backends)."""

from benchmark.lazy_backends import defer_optional_backends
from benchmark.quiet import silence_third_party_notices

silence_third_party_notices()
defer_optional_backends()

"""Benchmark harness for memory-efficient personalization of text-to-image diffusion models.

Importing it first silences known third-party start-up notices (benchmark.quiet)."""

from benchmark.quiet import silence_third_party_notices

silence_third_party_notices()

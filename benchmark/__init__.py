"""Benchmark harness for memory-efficient personalization of text-to-image diffusion models."""

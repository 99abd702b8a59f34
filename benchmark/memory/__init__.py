"""Training memory: measured (profiling: allocator and NVML peaks, the breakdown by category),
predicted without a GPU or weights (estimate: the method's steps under fake tensors, counted by
tracker's live-storage tracker; pass_replay replays repeated no-grad passes), the
`python -m benchmark.memory` table (cli) and the model-by-GPU map (map)."""

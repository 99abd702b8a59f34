"""Sweeps: planning an experiment's runs (plan, with Hydra's config composition in jobs), their
status (status: `python -m benchmark.sweep`), the input checks every command makes before it
starts (preflight) and the SLURM launcher's job watching (slurm)."""

#!/usr/bin/env bash
# A one-node SLURM cluster for tests/test_slurm.py (idempotent; see .ci/slurm/up.sh).
set -euo pipefail
exec bash "$(dirname "$0")/../slurm/up.sh"

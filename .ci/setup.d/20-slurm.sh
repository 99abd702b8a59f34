#!/usr/bin/env bash
# A one-node SLURM cluster for tests/sweep/test_slurm.py (idempotent; see .ci/slurm/up.sh). If it does
# not come up, the rest of the suite still runs: the SLURM tests then fail (CI=true) saying so.
set -uo pipefail
bash "$(dirname "$0")/../slurm/up.sh" || echo "setup: no SLURM cluster (see above); tests/sweep/test_slurm.py will fail" >&2

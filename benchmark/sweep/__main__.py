"""`python -m benchmark.sweep experiment=<name> [overrides]`: the sweep's status (benchmark.sweep.status)."""

import sys

from benchmark.sweep.status import main

sys.exit(main(sys.argv[1:]))

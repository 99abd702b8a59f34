"""`python -m benchmark.report experiment=<name> [overrides]` (benchmark.report.cli)."""

import sys

from benchmark.report.cli import main

sys.exit(main(sys.argv[1:]))

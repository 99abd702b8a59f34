"""Developer tools, each `python -m benchmark.devtools.<name>` (and a nox session): training
speed (speed), start-up cost of the commands (startup_cost) and the Selective method's
calibration (calibrate_selective). Nothing in the run pipeline imports them."""

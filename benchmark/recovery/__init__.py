"""The known-answer experiment (`experiment=recovery`): a hidden teacher drawn per seed
(teacher: teachers, held-out scoring, snapshots), the fitted tiny base (fit), the run that
trains towards and scores against the teacher (run), its report (report: `python -m
benchmark.report experiment=recovery`) and the noise-floor probe (probe: `python -m
benchmark.recovery.probe`)."""

"""Known-answer personalization, the token arms: every token arm (TI, ZOODiP, GF-TI and the
comparison arms naive ZO-TI, SPSA, one-point), run once on the tiny model with the fitted base
and the fitted teacher token, closes at least a set share of what it closed on the same seed
(an arm whose learning halves fails), its apply puts the teacher in, and TI (backprop) is ahead
of naive ZO-TI at equal steps.
"""

from __future__ import annotations

import pytest

from benchmark.run import run
from tests.conftest import OnDemand, compose

# xdist_group: one worker runs the fixture once
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("recovery_tokens")]

# The CI configuration is the full version's (conf/experiment/recovery.yaml: a 100-step joint fit
# of W and the teacher token, 60 teacher-only steps, 100 training steps at lr 1e-3, GF-TI 20
# CMA-ES generations from the class noun, 64 held-out draws) at one seed; the margins come from
# seeds 0-7 of it (docs/recovery.md, "Token arms"):
#   python -m benchmark -m experiment=recovery \
#       '+experiment/recovery=ti,zoti_naive,zoodip,zoodip_spsa,zoodip_one_point,gfti' \
#       seed=0,1,2,3,4,5,6,7 data.root=../shared/dreambooth/dataset paths.results=<dir>
SEED = 0
# arm: (the seed-0 fraction of the gap closed at step 100 (GF-TI: generation 20), the bound's
# share of it, the greatest prediction distance to the teacher or None). Seed 0, the CI seed,
# measured three times (the whole run of 2026-12-02, a rerun of seed 0 on 2026-12-07 and the whole
# run of 2026-12-07, one thread; the fitted base differs in float rounding between machines and
# thread counts): TI 0.96 / 0.96 / 0.96, naive ZO-TI 0.62 / 0.56 / 0.56, ZOODiP 0.60 / 0.55 / 0.55,
# SPSA 0.80 / 0.71 / 0.71, one-point 0.53 / 0.65 / 0.65, GF-TI 0.94 / 0.87 / 0.92; the smallest is
# the value below. The bound: 0.8 of it for TI (backprop, the same to 0.01 in all three), 0.5 for
# the zeroth-order arms and GF-TI (CMA-ES), whose seed-0 value moved by up to 0.12 between the
# runs: an arm whose learning halves fails. The distance bound:
# the greatest over seeds 0-7 plus a margin (ZOODiP 0.77 / 0.80, GF-TI 0.53 / 0.41 in the two whole
# runs; none for TI, whose seed-7 0.90 / 0.94 leaves no useful bound).
MARGINS = {
    "ti": (0.96, 0.8, None),
    "zoodip": (0.55, 0.5, 0.9),
    "zoti_naive": (0.56, 0.5, None),
    "zoodip_spsa": (0.71, 0.5, None),
    "zoodip_one_point": (0.53, 0.5, None),
    "gfti": (0.87, 0.5, 0.7),
}
# The method's apply of the teacher against the teacher written into the embedding table
# (recovery_apply_error; TI exact, the quantized U-Net of ZOODiP / GF-TI's fp16 encoder not)
APPLY_ERROR = 0.02
# TI was ahead of naive ZO-TI at every curve point (steps 25/50/75/100) on every one of seeds
# 0-7 in one run, at 31 of the 32 in the whole runs of 2026-12-02 and 2026-12-07 (seed 4, step 100:
# -0.04 and -0.02); on seed 0, the CI seed, by 0.64 / 0.42 / 0.28 / 0.34 and 0.67 / 0.51 / 0.33 / 0.39.
AHEAD, BEHIND = "ti", "zoti_naive"
# The gap over seeds 0-7 was 6.2-13.2 % of L_init; the most any token arm closed at any curve
# point (lr 1e-3 and 5e-3; GF-TI at any generation) was 0.98 (0.99 in the whole run of
# 2026-12-07): the fitted teacher token is near the optimum on S.
LEAST_GAP, MOST_CLOSED = 0.03, 1.1


@pytest.fixture(scope="session")  # session: never torn down between modules on a worker
def token_runs(tmp_path_factory, dataset_root):
    """{arm: record}: each token arm run once when first read, one results folder (one fitted base)."""
    results = tmp_path_factory.mktemp("recovery_tokens") / "results"

    def make(key: str) -> dict:
        arm, _, lean = key.partition("+")
        return run(
            compose(
                [
                    "experiment=recovery",
                    f"+experiment/recovery={arm}",
                    f"seed={SEED}",
                    f"data.root={dataset_root}",
                    f"paths.results={results}",
                    "train.progress=false",
                    "train.profile_steps=0",
                    *(LEANEST if lean else ()),
                ]
            )  # fmt: skip
        )

    return OnDemand(make)


@pytest.mark.parametrize("arm", list(MARGINS))
def test_every_token_method_closes_a_real_part_of_the_gap(token_runs, arm):
    record = token_runs[arm]
    assert record["status"] == "ok", record["error"]
    assert record["recovery_gap"] > LEAST_GAP * record["recovery_loss_initial"]  # a gap worth closing
    seed0, share, most_distance = MARGINS[arm]
    assert record["recovery_gap_closed"] > share * seed0, record["curve_gap_closed"]
    if most_distance is not None:
        assert record["recovery_prediction_distance"] < most_distance
    assert max(record["curve_gap_closed"]) < MOST_CLOSED  # the teacher is near the optimum on S
    assert record["recovery_apply_error"] < APPLY_ERROR  # the method's apply puts the teacher in


# TI's leanest standard setting (methods/common/savers.py): bf16 autocast with the U-Net and VAE in
# bf16, checkpointing, 8-bit AdamW over the embedding matrix.
LEANEST = ("train.mixed_precision=bf16", "train.gradient_checkpointing=true", "method.optimizer=adamw8bit")


def test_ti_closes_its_gap_with_the_leanest_savers(token_runs):
    lean, full = token_runs["ti+lean"], token_runs["ti"]
    assert lean["status"] == "ok", lean["error"]
    assert lean["train.mixed_precision"] == "bf16" and lean["method.optimizer"] == "adamw8bit"
    seed0, share, _ = MARGINS["ti"]
    assert lean["recovery_gap_closed"] > share * seed0, lean["curve_gap_closed"]
    assert abs(lean["recovery_gap_closed"] - full["recovery_gap_closed"]) < 0.2


def test_ti_is_ahead_of_naive_zo_ti_at_every_equal_step(token_runs):
    """Backprop against the zeroth-order estimate of the same loss (2 random directions a step),
    the same lr and steps: TI has closed more of the gap at every snapshot after the start."""
    ahead, behind = (token_runs[arm] for arm in (AHEAD, BEHIND))
    assert ahead["curve_step"] == behind["curve_step"] == [0, 25, 50, 75, 100]
    assert all(a > b for a, b in zip(ahead["curve_gap_closed"][1:], behind["curve_gap_closed"][1:])), (
        ahead["curve_gap_closed"],
        behind["curve_gap_closed"],
    )


def test_token_arms_share_the_fitted_base(token_runs):
    bases = {token_runs[arm]["recovery_base"] for arm in MARGINS}
    assert len(bases) == 1

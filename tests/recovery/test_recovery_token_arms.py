"""Known-answer personalization, the token arms: TI, ZOODiP and GF-TI, run once on
the tiny model with the fitted base and the fitted teacher token, close a real part of the gap,
and TI (backprop) is ahead of naive ZO-TI at equal steps.

The margins come from the same configuration over 8 seeds (README, "Token arms"; the command is
below): each bound is well inside the worst measured value.
"""

from __future__ import annotations

import pytest

from benchmark.run import run
from tests.conftest import compose

# xdist_group: one worker runs the fixture once
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("recovery_tokens")]

# The CI configuration is the full version's (conf/experiment/recovery.yaml: a 100-step joint fit
# of W and the teacher token, 60 teacher-only steps, 100 training steps at lr 1e-3, GF-TI 20
# CMA-ES generations from the class noun, 64 held-out draws) at one seed; the margins come from
# seeds 0-7 of it (README, "Token arms"):
#   python -m benchmark -m experiment=recovery \
#       '+experiment/recovery=ti,zoti_naive,zoodip,zoodip_spsa,zoodip_one_point,gfti' \
#       seed=0,1,2,3,4,5,6,7 data.root=../shared/dreambooth/dataset paths.results=<dir>
SEED = 0
# arm: (least fraction of the gap closed at step 100, greatest prediction distance to the
# teacher or None; GF-TI: at generation 20). Measured over seeds 0-7, min closed / max distance:
# TI 0.08 / 0.90 (seed 7, where TI drifts back after step 25; the others 0.77-0.96 / 0.04-0.20),
# ZOODiP 0.22 / 0.77 (rerun on another machine: 0.28 / 0.70), GF-TI 0.45 / 0.53 (seed 3; the
# others 0.77-0.94 / 0.06-0.18). The bounds: half the least closed; the greatest distance plus a
# margin (below 1: the predictions moved toward the teacher's); none for TI, whose seed-7
# distance (0.90) leaves no useful bound.
MARGINS = {"ti": (0.04, None), "zoodip": (0.11, 0.9), "gfti": (0.22, 0.7)}
# TI was ahead of naive ZO-TI at every curve point (steps 25/50/75/100) on every one of seeds
# 0-7 in one run, at 31 of the 32 in the rerun (seed 4, step 100: -0.04); on seed 0, the CI seed,
# by 0.56 / 0.33 / 0.24 / 0.35 and 0.64 / 0.42 / 0.28 / 0.34.
AHEAD, BEHIND = "ti", "zoti_naive"
# The gap over seeds 0-7 was 6.2-13.2 % of L_init; the most any token arm closed at any curve
# point (lr 1e-3 and 5e-3; GF-TI at any generation) was 0.98: the fitted teacher token is near
# the optimum on S.
LEAST_GAP, MOST_CLOSED = 0.03, 1.1


@pytest.fixture(scope="session")  # session: never torn down between modules on a worker
def token_runs(tmp_path_factory, dataset_root):
    """{arm: record}: TI, ZOODiP, GF-TI and naive ZO-TI once, one results folder (one fitted base)."""
    results = tmp_path_factory.mktemp("recovery_tokens") / "results"
    records = {}
    for arm in (*MARGINS, BEHIND):
        cfg = compose(
            ["experiment=recovery", f"+experiment/recovery={arm}", f"seed={SEED}",
             f"data.root={dataset_root}", f"paths.results={results}", "train.progress=false",
             "train.profile_steps=0"]
        )  # fmt: skip
        records[arm] = run(cfg)
    return records


@pytest.mark.parametrize("arm", list(MARGINS))
def test_every_token_method_closes_a_real_part_of_the_gap(token_runs, arm):
    record = token_runs[arm]
    assert record["status"] == "ok", record["error"]
    assert record["recovery_gap"] > LEAST_GAP * record["recovery_loss_initial"]  # a gap worth closing
    least_closed, most_distance = MARGINS[arm]
    assert record["recovery_gap_closed"] > least_closed
    if most_distance is not None:
        assert record["recovery_prediction_distance"] < most_distance
    assert max(record["curve_gap_closed"]) < MOST_CLOSED  # the teacher is near the optimum on S


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
    bases = {record["recovery_base"] for record in token_runs.values()}
    assert len(bases) == 1

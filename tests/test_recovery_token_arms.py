"""Known-answer personalization, the token arms (issue 19): TI and ZOODiP, run once on the tiny
model with the fitted base and the fitted teacher token, close a real part of the gap.

The margins come from the same configuration over 8 seeds (README, "Token arms"; the command is
below): each bound is well inside the worst measured value.
"""

from __future__ import annotations

import pytest

from benchmark.run import run
from tests.conftest import compose

pytestmark = pytest.mark.xdist_group("recovery_tokens")  # one worker runs the fixture once

# The CI configuration is the full version's (conf/experiment/recovery.yaml: a 100-step joint fit
# of W and the teacher token, 60 teacher-only steps, 100 training steps, 64 held-out draws) at one
# seed; the margins come from seeds 0-7 of it (README, "Token arms"):
#   python -m benchmark -m experiment=recovery \
#       '+experiment/recovery=ti,zoti_naive,zoodip,zoodip_spsa,zoodip_one_point' seed=0,1,2,3,4,5,6,7 \
#       data.root=../shared/dreambooth/dataset paths.results=<dir>
SEED = 0
# arm: (least fraction of the gap closed at step 100, greatest prediction distance to the
# teacher). Measured over seeds 0-7, min closed / max distance: TI 0.30 / 0.65 (seed 7; the
# others 0.59-0.97), ZOODiP 0.62 / 0.33. The bounds: half the least closed, the greatest
# distance plus a margin (below 1: the predictions moved toward the teacher's).
MARGINS = {"ti": (0.15, 0.8), "zoodip": (0.3, 0.5)}
# The gap over seeds 0-7 was 6.2-13.4 % of L_init; the most any token arm closed at any curve
# point was 0.98: the fitted teacher token is near the optimum on S, so the score is bounded.
LEAST_GAP, MOST_CLOSED = 0.03, 1.1


@pytest.fixture(scope="session")  # session: never torn down between modules on a worker
def token_runs(tmp_path_factory, dataset_root):
    """{arm: record}: TI and ZOODiP once, one results folder (one fitted base, shared)."""
    results = tmp_path_factory.mktemp("recovery_tokens") / "results"
    records = {}
    for arm in MARGINS:
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
    assert record["recovery_prediction_distance"] < most_distance
    assert max(record["curve_gap_closed"]) < MOST_CLOSED  # the teacher is near the optimum on S


def test_token_arms_share_the_fitted_base(token_runs):
    assert token_runs["ti"]["recovery_base"] == token_runs["zoodip"]["recovery_base"]

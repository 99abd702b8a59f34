"""The recovery report's statistics and per-seed file (benchmark/report/recovery.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from benchmark.report.recovery import per_seed, summarize, t_interval, t_quantile


def test_t_interval_known_values():
    low, high = t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, n = 3: 2 ± 4.303 / √3
    assert (low, high) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert t_quantile(7) == 2.365  # n = 8 seeds
    assert t_quantile(31) == pytest.approx(2.0395, abs=2e-4) and t_quantile(1000) == pytest.approx(
        1.9623, abs=2e-4
    )
    assert all(math.isnan(v) for v in t_interval([1.0]))


def test_the_t_interval_is_wider_than_the_percentile_bootstrap_at_n_8():
    values = np.random.default_rng(0).normal(0.5, 0.2, 8)
    table = summarize(pd.DataFrame({"recovery.arm": "a", "seed": range(8), "state": "ok",
                                    "recovery_gap_closed": values, "recovery_loss": 0.0,
                                    "recovery_loss_initial": 0.0}))  # fmt: skip
    (row,) = table.to_dict("records")
    assert row["gap_closed_t_low"] < row["gap_closed_ci_low"] < row["gap_closed"]
    assert row["gap_closed"] < row["gap_closed_ci_high"] < row["gap_closed_t_high"]


def test_per_seed_lists_every_run_with_its_curve():
    runs = pd.DataFrame(
        [{"recovery.arm": "ti", "method": "ti", "seed": 1, "state": "ok", "recovery_gap_closed": 0.5,
          "curve_gap_closed": [0.0, None, 0.5]},
         {"recovery.arm": "ti", "method": "ti", "seed": 0, "state": "failed", "recovery_gap_closed": None,
          "curve_gap_closed": None}]
    )  # fmt: skip
    table = per_seed(runs)
    assert list(table.columns) == [
        "arm",
        "method",
        "seed",
        "state",
        "recovery_gap_closed",
        "curve_gap_closed",
    ]
    assert list(table["seed"]) == [0, 1] and list(table["state"]) == ["failed", "ok"]
    assert list(table["curve_gap_closed"]) == ["", "0 /  / 0.5"]

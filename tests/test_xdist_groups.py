"""The suite relies on `pytest -n 2 --dist loadgroup` keeping each xdist_group on one worker (the
SLURM tests' shared sweeps, the recovery arms' shared fits): a group that is silently ignored
makes every worker redo the group's fixtures (pytest 9 with pytest-xdist 3.8 did)."""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("probe")
def test_an_xdist_group_reaches_the_scheduler(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run with --dist loadgroup")
    assert request.node.nodeid.endswith("@probe")  # what LoadGroupScheduling groups by

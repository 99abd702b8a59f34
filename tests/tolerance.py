"""Comparing float results that were computed in a different order.

A batch against its samples one by one, a fused LoRA against an attached one, a hollowed forward
against the full one: the same arithmetic, summed in another order. They differ by rounding, and by
how much depends on the CPU's BLAS blocking and thread count, not on the code under test. So the
tolerance follows from the dtype's precision and the scale of the values compared, never from one
machine: ``REORDER_EPS_MULTIPLE`` machine epsilons of the largest magnitude, room for rounding that
accumulates over a few dozen layers (fp32: 1.2e-7 x 1000 = 1.2e-4 of the scale). A test that uses it
also checks that the effect it is about is far larger than the tolerance, so it can still fail.
"""

from __future__ import annotations

import torch

REORDER_EPS_MULTIPLE = 1000


def reorder_atol(expected: torch.Tensor) -> float:
    """Absolute tolerance for ``expected`` recomputed in another summation order."""
    scale = expected.detach().abs().max().item()
    return REORDER_EPS_MULTIPLE * torch.finfo(expected.dtype).eps * max(scale, 1e-30)


def assert_close_up_to_reordering(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=reorder_atol(expected))


def assert_effect_dwarfs_tolerance(changed: torch.Tensor, expected: torch.Tensor, factor: float = 100.0):
    """The effect under test (``changed`` vs ``expected``) is ``factor`` times the tolerance: a wrong
    result could not pass as rounding."""
    effect = (changed - expected).abs().max().item()
    assert effect > factor * reorder_atol(expected), f"effect {effect:.3g} is within reach of the tolerance"

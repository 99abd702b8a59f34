"""Zeroth-order gradient estimators: d loss / d params from forward passes alone.

``estimate_gradient(loss_fn, params, estimator, n, mu, generator)`` perturbs ``params`` in
place, calls ``loss_fn()`` (which reads them), and puts them back bit-exactly from a saved
copy. With directions z_i (i = 1..n), step ``mu`` and d = number of parameter entries:

- ``rge`` (random gradient estimator, ZOODiP eq. and official code): z_i ~ N(0, I);
  g = (1/n) sum_i (L(p + mu z_i) - L(p)) / mu * z_i. n + 1 forward passes (one clean loss
  shared by all directions).
- ``spsa`` (two-sided, Rademacher z_i in {-1, +1}^d):
  g = (1/n) sum_i (L(p + mu z_i) - L(p - mu z_i)) / (2 mu) * z_i. 2n forward passes; the
  returned loss is the mean of the 2n losses (= L(p) + O(mu^2)): no clean pass is spent.
- ``one_point`` (residual feedback, Zhang et al. 2022): z_0..z_n ~ N(0, I);
  g = (1/n) sum_{i=1..n} (L(p + mu z_i) - L(p + mu z_{i-1})) / mu * z_i. n + 1 forward passes,
  one perturbed loss per direction, the previous one as baseline; the returned loss is the
  mean of the n + 1 losses.

Every one is unbiased for the gradient of the mu-smoothed loss (E[z z^T] = I). With
``normalize=True`` the average is further divided by sqrt((d + n - 1) / n): the official
ZOODiP code's scale (it divides the sum by n * sqrt((d + n - 1) / n), d = 768 minus the
dimensions Subspace Gradient projects out; pass that as ``effective_dim``). The official code
uses it for RGE only; here it applies to every estimator so that swapping the estimator in an
ablation keeps the step size comparable.

Memory: one saved copy of ``params``, one gradient buffer, one direction at a time. Each
direction is regenerated from the generator state it was drawn from (a per-direction seed),
never stored while the loss is evaluated. All randomness comes from ``generator`` (CPU),
so a run is reproducible and resumable; nothing calls ``.item()`` (FakeTensorMode-safe).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from methods.common.base import require

ESTIMATORS = ("rge", "spsa", "one_point")


def forward_passes(estimator: str, n: int) -> int:
    """Loss evaluations one ``estimate_gradient`` call makes."""
    check_estimator(estimator, n)
    return 2 * n if estimator == "spsa" else n + 1


def check_estimator(estimator: str, n: int, mu: float = 1e-3) -> None:
    require(
        estimator in ESTIMATORS, f"method.estimator={estimator!r}; choose one of: {', '.join(ESTIMATORS)}"
    )
    require(n >= 1, f"method.n={n} must be >= 1 (number of random directions per step)")
    require(mu > 0, f"method.mu={mu} must be > 0 (perturbation step)")


def _draw(generator: torch.Generator, params: Sequence[torch.Tensor], rademacher: bool) -> list[torch.Tensor]:
    """One direction: a tensor per param, drawn on the CPU generator in fp32, then moved."""
    out = []
    for p in params:
        if rademacher:
            z = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8).to(torch.float32) * 2 - 1
        else:
            z = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        out.append(z.to(p.device))
    return out


class _Directions:
    """Directions remembered by their generator state (a seed), regenerated on demand."""

    def __init__(self, generator: torch.Generator, params: Sequence[torch.Tensor], rademacher: bool):
        self.generator, self.params, self.rademacher = generator, params, rademacher

    def new(self) -> torch.Tensor:
        """Draw the next direction; returns its seed (the generator state before the draw)."""
        state = self.generator.get_state()
        _draw(self.generator, self.params, self.rademacher)  # advance past it
        return state

    def get(self, seed: torch.Tensor) -> list[torch.Tensor]:
        return _draw(torch.Generator().set_state(seed), self.params, self.rademacher)


def _evaluate_at(loss_fn, params, clean, seed, directions: _Directions, scale: float) -> torch.Tensor:
    """loss_fn() at params = clean + scale * z(seed); params are put back bit-exactly after."""
    for p, c, z in zip(params, clean, directions.get(seed)):
        p.copy_(c)
        p.add_(z.to(p.dtype), alpha=scale)
    try:
        return loss_fn().detach().float()
    finally:
        for p, c in zip(params, clean):
            p.copy_(c)


def estimate_gradient(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    estimator: str = "rge",
    n: int = 2,
    mu: float = 1e-3,
    generator: torch.Generator | None = None,
    normalize: bool = True,
    effective_dim: int | torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(gradient estimate aligned with ``params`` in their dtypes, loss as a detached fp32 tensor).

    Runs under ``torch.no_grad()``; see the module docstring for the estimators and the
    normalization. ``effective_dim`` overrides d in the normalization (Subspace Gradient).
    ``generator``: a CPU generator (default: torch's global one)."""
    check_estimator(estimator, n, mu)
    params = list(params)
    generator = generator if generator is not None else torch.default_generator
    directions = _Directions(generator, params, rademacher=estimator == "spsa")
    with torch.no_grad():
        clean = [p.detach().clone() for p in params]
        grads = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]

        def accumulate(seed, coefficient):
            for g, z in zip(grads, directions.get(seed)):
                g.add_(z * coefficient.to(g.device))

        if estimator == "rge":
            loss = loss_fn().detach().float()
            for _ in range(n):
                seed = directions.new()
                perturbed = _evaluate_at(loss_fn, params, clean, seed, directions, mu)
                accumulate(seed, (perturbed - loss) / mu)
        elif estimator == "spsa":
            losses = []
            for _ in range(n):
                seed = directions.new()
                plus = _evaluate_at(loss_fn, params, clean, seed, directions, mu)
                minus = _evaluate_at(loss_fn, params, clean, seed, directions, -mu)
                accumulate(seed, (plus - minus) / (2 * mu))
                losses += [plus, minus]
            loss = torch.stack(losses).mean()
        else:  # one_point
            previous = _evaluate_at(loss_fn, params, clean, directions.new(), directions, mu)
            losses = [previous]
            for _ in range(n):
                seed = directions.new()
                current = _evaluate_at(loss_fn, params, clean, seed, directions, mu)
                accumulate(seed, (current - previous) / mu)
                losses.append(current)
                previous = current
            loss = torch.stack(losses).mean()

    return _scaled(grads, params, n, normalize, effective_dim), loss


def _scaled(grads, params, n: int, normalize: bool, effective_dim) -> list[torch.Tensor]:
    """The sum over directions divided by n (and with ``normalize`` by sqrt((d + n - 1) / n))."""
    d = effective_dim if effective_dim is not None else sum(p.numel() for p in params)
    scale = 1.0 / n
    if normalize:  # d may be a 0-d tensor (Subspace Gradient's effective dimension)
        scale = scale / ((d + n - 1) / n) ** 0.5
    return [(g * scale).to(p.dtype) for g, p in zip(grads, params)]


def estimate_gradient_batched(
    losses_fn: Callable[[list[list[torch.Tensor]]], torch.Tensor],
    params: Sequence[torch.Tensor],
    estimator: str = "rge",
    n: int = 2,
    mu: float = 1e-3,
    generator: torch.Generator | None = None,
    normalize: bool = True,
    effective_dim: int | torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``estimate_gradient`` with all its evaluation points in one call: ``losses_fn(points)``
    gets the ``forward_passes(estimator, n)`` parameter sets (each a list aligned with
    ``params``, which are left untouched) and returns their losses, shape (points,). The
    directions are the same draws in the same order, so the estimate differs from the
    sequential one only by the batched call's rounding. Memory: every point at once."""
    check_estimator(estimator, n, mu)
    params = list(params)
    generator = generator if generator is not None else torch.default_generator
    directions = _Directions(generator, params, rademacher=estimator == "spsa")
    with torch.no_grad():
        clean = [p.detach().clone() for p in params]

        def at(seed, scale):  # the bits _evaluate_at writes into params
            return [torch.add(c, z.to(c.dtype), alpha=scale) for c, z in zip(clean, directions.get(seed))]

        seeds = [directions.new() for _ in range(n + 1 if estimator == "one_point" else n)]
        if estimator == "rge":
            losses = losses_fn([clean] + [at(s, mu) for s in seeds]).detach().float()
            loss, terms = losses[0], [(s, (losses[i + 1] - losses[0]) / mu) for i, s in enumerate(seeds)]
        elif estimator == "spsa":
            losses = losses_fn([q for s in seeds for q in (at(s, mu), at(s, -mu))]).detach().float()
            plus, minus = losses[0::2], losses[1::2]
            loss, terms = losses.mean(), [(s, (plus[i] - minus[i]) / (2 * mu)) for i, s in enumerate(seeds)]
        else:  # one_point: each direction's loss minus the previous one's
            losses = losses_fn([at(s, mu) for s in seeds]).detach().float()
            loss = losses.mean()
            terms = [(s, (losses[i + 1] - losses[i]) / mu) for i, s in enumerate(seeds[1:])]
        grads = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        for seed, coefficient in terms:
            for g, z in zip(grads, directions.get(seed)):
                g.add_(z * coefficient.to(g.device))
    return _scaled(grads, params, n, normalize, effective_dim), loss

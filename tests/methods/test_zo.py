"""Zeroth-order building blocks: gradient estimators, Subspace Gradient, ZO-Adam, timestep
samplers. Checked against known answers (quadratics, PCA of a constructed history, torch's
Adam), not against themselves."""

from __future__ import annotations

import math

import pytest
import torch

from methods.common.base import ConfigError
from methods.common.subspace import SubspaceGradient
from methods.common.timesteps import sample_timesteps, sd_alphas_cumprod, snr_sampling_weights
from methods.common.zo import estimate_gradient, estimate_gradient_batched, forward_passes
from methods.common.zo_adam import ZOAdam

D = 10


def quadratic():
    """f(p) = 1/2 p^T A p - b^T p at p0, its exact gradient there, and the parameter."""
    g = torch.Generator().manual_seed(0)
    A = torch.diag(torch.linspace(1.0, 3.0, D, dtype=torch.float64))
    b = torch.randn(D, generator=g, dtype=torch.float64)
    p = torch.randn(D, generator=g, dtype=torch.float64)
    true_grad = A @ p - b
    return (lambda: 0.5 * p @ A @ p - b @ p), true_grad, p


def mean_estimate(estimator: str, samples: int, normalize: bool = False, n: int = 2) -> torch.Tensor:
    loss_fn, _, p = quadratic()
    generator = torch.Generator().manual_seed(1)
    total = torch.zeros(D, dtype=torch.float64)
    for _ in range(samples):
        (g,), _ = estimate_gradient(
            loss_fn, [p], estimator, n=n, mu=1e-3, generator=generator, normalize=normalize
        )
        total += g
    return total / samples


# Relative error of the mean of N estimates ~ sqrt(variance per estimate / N). RGE and SPSA:
# variance per direction ~ |g|^2 (d + 1) (Gaussian) or <= |g|^2 (Rademacher). One-point's
# baseline is itself a perturbed loss, so (z_i - z_{i-1}).g doubles the variance: its scale
# bound is looser (20 % against 10 %) at the same number of samples.
@pytest.mark.parametrize("estimator, scale_tolerance", [("rge", 0.1), ("spsa", 0.1), ("one_point", 0.2)])
def test_mean_estimate_matches_true_gradient(estimator, scale_tolerance):
    _, true_grad, _ = quadratic()
    mean = mean_estimate(estimator, 1500)
    assert torch.cosine_similarity(mean, true_grad, dim=0) > 0.95
    assert abs(mean.norm() / true_grad.norm() - 1) < scale_tolerance


def test_official_normalization_scales_rge_by_sqrt_of_dimension():
    _, true_grad, _ = quadratic()
    n = 2
    mean = mean_estimate("rge", 1500, normalize=True, n=n)
    expected = true_grad / math.sqrt((D + n - 1) / n)
    assert torch.cosine_similarity(mean, expected, dim=0) > 0.95
    assert abs(mean.norm() / expected.norm() - 1) < 0.1


@pytest.mark.parametrize("estimator", ["rge", "spsa", "one_point"])
def test_estimate_uses_stated_forward_passes_without_autograd_and_restores_params(estimator):
    p = torch.randn(7, generator=torch.Generator().manual_seed(0)).half()
    before = p.clone()
    calls, grad_modes = [], []

    def loss_fn():
        calls.append(p.clone())
        grad_modes.append(torch.is_grad_enabled())
        return (p.float() ** 2).sum()

    (g,), loss = estimate_gradient(
        loss_fn, [p], estimator, n=3, mu=1e-2, generator=torch.Generator().manual_seed(0)
    )
    assert len(calls) == forward_passes(estimator, 3) == (6 if estimator == "spsa" else 4)
    assert not any(grad_modes)
    assert torch.equal(p, before)  # bit-exact restore, even in fp16
    assert g.dtype == p.dtype and g.shape == p.shape and loss.dtype == torch.float32
    assert sum(not torch.equal(c, before) for c in calls) >= 3  # the perturbed evaluations moved p


@pytest.mark.parametrize("estimator", ["rge", "spsa", "one_point"])
def test_batched_points_give_the_sequential_estimate_bit_for_bit(estimator):
    # the same directions in the same order and the same combination: with losses that do not
    # depend on batching, the two estimates are the same bits
    loss_fn, _, p = quadratic()
    batches = []

    def losses_fn(points):
        batches.append(len(points))
        losses = []
        for (point,) in points:
            saved = p.clone()
            p.copy_(point)
            losses.append(loss_fn())
            p.copy_(saved)
        return torch.stack(losses)

    before = p.clone()
    (sequential,), loss = estimate_gradient(
        loss_fn, [p], estimator, 3, 1e-3, torch.Generator().manual_seed(4)
    )
    (batched,), batched_loss = estimate_gradient_batched(
        losses_fn, [p], estimator, 3, 1e-3, torch.Generator().manual_seed(4)
    )
    assert batches == [forward_passes(estimator, 3)]
    assert torch.equal(batched, sequential) and torch.equal(batched_loss, loss)
    assert torch.equal(p, before)


def test_same_generator_state_gives_the_same_estimate():
    loss_fn, _, p = quadratic()
    a, _ = estimate_gradient(loss_fn, [p], "rge", generator=torch.Generator().manual_seed(5))
    b, _ = estimate_gradient(loss_fn, [p], "rge", generator=torch.Generator().manual_seed(5))
    c, _ = estimate_gradient(loss_fn, [p], "rge", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("bad", [{"estimator": "fd"}, {"n": 0}, {"mu": 0.0}])
def test_bad_estimator_settings_are_config_errors(bad):
    p = torch.zeros(3)
    kwargs = {"estimator": "rge", "n": 2, "mu": 1e-3, **bad}
    with pytest.raises(ConfigError):
        estimate_gradient(lambda: p.sum(), [p], **kwargs)


# -- Subspace Gradient ----------------------------------------------------------------------
def subspace_history(tau=64, dim=16, k=3, noise=1e-4):
    """Token values confined to a k-dim subspace (plus small noise) whose coordinates all have
    the same variance, so per-dimension standardization keeps the subspace (the official code
    standardizes before PCA)."""
    g = torch.Generator().manual_seed(0)
    hadamard = torch.ones(1, 1)
    while hadamard.shape[0] < dim:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    basis = hadamard[1 : k + 1] / math.sqrt(dim)  # orthonormal rows, every column the same norm
    coefficients = torch.randn(tau, k, generator=g)
    coefficients, _ = torch.linalg.qr(coefficients - coefficients.mean(0))  # centered, orthonormal
    values = 3.0 * coefficients @ basis + 0.5 + noise * torch.randn(tau, dim, generator=g)
    return values, basis


def test_subspace_gradient_removes_directions_outside_the_history_subspace():
    values, basis = subspace_history()
    sg = SubspaceGradient(dim=16, tau=64, nu=1e-3)
    outside = torch.randn(16, generator=torch.Generator().manual_seed(1))
    outside -= basis.T @ (basis @ outside)
    inside = basis.T @ torch.tensor([1.0, -2.0, 0.5])
    for v in values:
        assert torch.equal(sg.project(outside), outside), "no projection before tau values"
        sg.record(v)
    assert int(sg.removed_dims()) == 16 - 3 and int(sg.effective_dim()) == 3
    assert sg.project(outside).norm() < 1e-2 * outside.norm()
    assert (sg.project(inside) - inside).norm() < 1e-2 * inside.norm()


def test_subspace_gradient_with_nu_zero_keeps_everything():
    values, _ = subspace_history()
    sg = SubspaceGradient(dim=16, tau=64, nu=0.0)
    for v in values:
        sg.record(v)
    grad = torch.randn(16, generator=torch.Generator().manual_seed(2))
    assert int(sg.removed_dims()) == 0
    assert torch.equal(sg.project(grad), grad)


def test_subspace_gradient_state_round_trips():
    values, _ = subspace_history()
    sg = SubspaceGradient(dim=16, tau=64, nu=1e-3)
    for v in values[:60]:
        sg.record(v)
    copy = SubspaceGradient(dim=16, tau=64, nu=1e-3)
    copy.load_state_dict(sg.state_dict())
    for v in values[:10]:  # crosses the recomputation at 64 values
        sg.record(v)
        copy.record(v)
    assert int(copy.removed_dims()) > 0
    grad = torch.randn(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sg.project(grad), copy.project(grad))


# -- ZO-Adam ------------------------------------------------------------------------------
def test_zo_adam_is_adam_with_eps_1e_3_and_touches_no_grad():
    g = torch.Generator().manual_seed(0)
    ours = torch.randn(5, generator=g)
    reference = torch.nn.Parameter(ours.clone())
    adam = ZOAdam([ours], lr=0.05)
    torch_adam = torch.optim.Adam([reference], lr=0.05, betas=(0.9, 0.999), eps=1e-3)
    for _ in range(5):
        grad = torch.randn(5, generator=g) * 1e-2
        adam.step([grad])
        reference.grad = grad.clone()
        torch_adam.step()
    assert ours.grad is None
    torch.testing.assert_close(ours, reference.detach(), rtol=1e-5, atol=1e-6)


def official_fp16_zo_adam_step(param, grad, m, v, iteration, lr, b1=0.9, b2=0.999):
    """The official train_zoodip.py ZOAdam.update arithmetic, on fp16 tensors."""
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * (grad**2)
    m_hat = m / (1 - b1**iteration)
    v_hat = v / (1 - b2**iteration)
    return param - lr * m_hat / (torch.sqrt(v_hat) + 1e-3), m, v


def test_zo_adam_fp16_state_reproduces_the_official_fp16_arithmetic():
    g = torch.Generator().manual_seed(0)
    token = torch.randn(64, generator=g).half()
    ours = token.clone()
    adam = ZOAdam([ours], lr=5e-3, state_dtype="fp16")
    reference, m, v = token.clone(), torch.zeros_like(token), torch.zeros_like(token)
    for i in range(1, 6):
        grad = (torch.randn(64, generator=g) * 10 ** torch.empty(64).uniform_(-4, -1, generator=g)).half()
        adam.step([grad])
        reference, m, v = official_fp16_zo_adam_step(reference, grad, m, v, i, lr=5e-3)
        assert torch.equal(ours, reference), i


@pytest.mark.parametrize("magnitude, ratio", [(1e-3, 2.0), (3e-4, 1.3), (1e-1, 1.0)])
def test_zo_adam_fp16_state_underflows_and_steps_larger_for_small_gradients(magnitude, ratio):
    """(1 - b2) g^2 underflows in fp16 below |g| ~ 5e-3: v stays 0 and the step is
    lr * m_hat / eps instead of lr * m_hat / (|g| + eps): (|g| + eps) / eps times larger."""
    steps = {}
    for dtype in ("fp16", "fp32"):
        token = torch.zeros(8)
        adam = ZOAdam([token], lr=1e-2, state_dtype=dtype)
        adam.step([torch.full((8,), magnitude)])
        steps[dtype] = -token
    assert steps["fp16"].mean().item() / steps["fp32"].mean().item() == pytest.approx(ratio, rel=0.02)


# -- timestep samplers ----------------------------------------------------------------------
def test_puts_draws_only_in_its_range_and_uniform_covers_all():
    g = torch.Generator().manual_seed(0)
    puts = sample_timesteps("puts", 20000, g, 1000, 500, 900)
    assert puts.min() == 500 and puts.max() == 899
    uniform = sample_timesteps("uniform", 20000, g, 1000, 500, 900)
    assert uniform.min() == 0 and uniform.max() == 999
    assert (uniform < 500).float().mean().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(
    "kind, T_L, T_U",
    [
        ("puts", 900, 500),
        ("puts", 500, 500),
        ("puts", -1, 900),
        ("puts", 500, 1001),
        ("uniform", 700, 600),
        ("nope", 500, 900),
    ],
)
def test_bad_timestep_settings_are_config_errors(kind, T_L, T_U):
    with pytest.raises(ConfigError):
        sample_timesteps(kind, 1, torch.Generator(), 1000, T_L, T_U)


def test_snr_sampler_follows_min_snr_weights():
    abar = sd_alphas_cumprod(1000)
    weights = snr_sampling_weights(abar, gamma=5.0)
    snr = abar / (1 - abar)
    assert torch.all(weights[snr <= 5] == 1) and torch.all(weights[snr > 5] < 1)
    draws = sample_timesteps("snr", 50000, torch.Generator().manual_seed(0), 1000, alphas_cumprod=abar)
    expected = (weights / weights.sum())[:100].sum().item()  # the clean end is down-weighted
    assert (draws < 100).float().mean().item() == pytest.approx(expected, abs=0.01)
    assert expected < 0.05  # far below uniform's 0.1

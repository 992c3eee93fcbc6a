"""No silent wrong numbers in the stochastic and nonsmooth iterations and the outer loops.

A quadratic bilevel problem with a closed-form solution and a known Lipschitz constant
``L = 1``::

    ĝ(w, λ, ξ) = ½ wᵀHw − wᵀ(Bλ + c + mean(ξ))     (ξ: a batch of noise rows, E ξ = 0)
    f(w, λ)    = ½ ‖w − t‖²
    w(λ) = H⁻¹(Bλ + c),   ∇F(λ) = Bᵀ H⁻¹ (w(λ) − t)

SGD on ĝ with a constant step η contracts for η < 2/L and diverges above it; at η = 2.05/L
the error grows like 1.05^t (×131 in 100 steps), far below a 10⁶ blow-up threshold, and must
still be reported.  Honest runs (noisy minibatches, warm starts at the solution, decreasing
steps) must never be.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl
from bilevel import nonsmooth as N
from bilevel import prox as P

DT = torch.float64
D, M = 5, 2

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


def _problem():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=DT))[0]
    H = Q @ torch.diag(torch.linspace(0.2, 1.0, D, dtype=DT)) @ Q.T  # L = λ_max(H) = 1
    B = torch.randn(D, M, generator=g, dtype=DT)
    t = torch.randn(D, generator=g, dtype=DT)
    lam = torch.randn(M, generator=g, dtype=DT)
    # the solution has a component 3 along H's top eigenvector: from params0 = 0, the mode
    # that a step above 2/L makes grow starts well above the noise
    w = 3 * Q[:, -1] + torch.randn(D, generator=g, dtype=DT)
    c = H @ w - B @ lam
    exact = B.T @ torch.linalg.solve(H, w - t)
    return H, B, c, t, lam, w, exact


H, B, C, TARGET, LAM, W_STAR, EXACT = _problem()


def inner_loss(w, lam, batch):
    return 0.5 * w @ H @ w - w @ (B @ lam + C + batch.mean(0))


def outer_loss(w, lam, batch=None):
    return 0.5 * ((w - TARGET) ** 2).sum()


def fixed_point(w, lam, batch):  # Φ̂ = w − ∇ĝ/L: a 0.8-contraction
    return w - (H @ w - B @ lam - C - batch.mean(0))


class Noise:
    """Endless batches of ``size`` Gaussian noise rows (std ``sigma``), seeded; re-iterable."""

    def __init__(self, seed, sigma=0.2, size=4):
        self.seed, self.sigma, self.size = seed, sigma, size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.sigma * torch.randn(self.size, D, generator=g, dtype=DT)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- 1. slow divergence


@pytest.mark.parametrize("eta", [2.05, 2.2])
def test_sid_reports_a_step_just_above_2_over_L(eta):
    for seed in range(20):
        with pytest.raises(bl.NotContractionError, match=r"grew from .* over 100 steps.*must be < 2/L.*lower "
                                                         r"inner_step_size"):
            bl.sid(outer_loss, torch.zeros(D, dtype=DT), LAM, Noise(seed), inner_loss=inner_loss,
                   outer_batches=[None], inner_steps=100, linear_steps=100, inner_step_size=eta)
    # the linear system's iterations v ← v + η(∇_w f − Hv) diverge the same way
    with pytest.raises(bl.NotContractionError, match=r"linear system.*over 100 steps.*lower linear_step_size"):
        bl.sid(outer_loss, W_STAR, LAM, Noise(0), inner_loss=inner_loss, outer_batches=[None],
               inner_steps=100, linear_steps=100, inner_step_size=1.0, linear_step_size=eta)
    # and the fixed-point form: w + η(Φ̂(w) − w) with η·(1/L) = eta/L
    with pytest.raises(bl.NotContractionError, match=r"fixed_point.*over 100 steps.*lower step_size"):
        bl.stochastic_fixed_point(torch.zeros(D, dtype=DT), LAM, Noise(1), fixed_point=fixed_point, steps=100,
                                  step_size=eta)


def test_honest_noisy_runs_never_report_divergence():
    ests = []
    for seed in range(20):
        # a contraction with noisy minibatches, from a cold start
        hg = bl.sid(outer_loss, torch.zeros(D, dtype=DT), LAM, Noise(seed), inner_loss=inner_loss,
                    outer_batches=[None], inner_steps=100, linear_steps=100, inner_step_size=1.5,
                    linear_step_size=1.0)
        ests.append(hg)
        # a warm start at the solution: the steps hover at the noise level from the start
        w = bl.stochastic_fixed_point(W_STAR, LAM, Noise(100 + seed), inner_loss=inner_loss, steps=200,
                                      step_size=1.9)
        assert _rel(w, W_STAR) < 0.5
        # a decreasing schedule (η_0 = 2/L, above the edge for the first steps only)
        w = bl.stochastic_fixed_point(torch.zeros(D, dtype=DT), LAM, Noise(200 + seed), fixed_point=fixed_point,
                                      steps=200, step_size=bl.DecreasingStep(10.0, 5.0))
        assert _rel(w, W_STAR) < 0.1
    # unbiased up to the noise: the mean of the 20 estimates is near the closed form
    assert _rel(torch.stack(ests).mean(0), EXACT) < 0.05
    # without noise SID is exact
    hg = bl.sid(outer_loss, torch.zeros(D, dtype=DT), LAM, Noise(0, sigma=0.0), inner_loss=inner_loss,
                outer_batches=[None], inner_steps=300, linear_steps=300, inner_step_size=1.5)
    assert _rel(hg, EXACT) < 1e-10


def test_under_vmap_every_row_is_judged():
    # a batch of problems s·ĝ: the step 1.5 is honest for s = 1 and 2.1/L for s = 1.4
    data = [torch.zeros(4, D, dtype=DT)]

    def solve(lam, s):
        return bl.sid(outer_loss, torch.zeros(D, dtype=DT), lam, data,
                      inner_loss=lambda w, lam, b: s * inner_loss(w, lam, b), outer_batches=[None],
                      inner_steps=300, linear_steps=300, inner_step_size=1.5, linear_step_size=1.0)

    lams = torch.stack([LAM, LAM, LAM])
    out = torch.func.vmap(solve)(lams, torch.tensor([1.0, 1.0, 1.0], dtype=DT))
    assert _rel(out[0], EXACT) < 1e-10 and torch.allclose(out, out[0].expand(3, M), atol=1e-12)
    with pytest.raises(bl.NotContractionError, match=r"grew from .* over 300 steps"):
        torch.func.vmap(solve)(lams, torch.tensor([1.0, 1.0, 1.4], dtype=DT))


def _g(w, lam):  # the deterministic inner loss, and its outer loss
    return 0.5 * w @ H @ w - w @ (B @ lam + C)


def test_outer_solvers_report_an_inner_step_just_above_2_over_L():
    lam0 = LAM.clone()
    for solver in (bl.AIDBilevel, bl.ITDBilevel):
        bad = solver(outer_loss, torch.zeros(D, dtype=DT), inner_loss=_g, lr=0.1, inner_steps=100,
                     inner_step_size=2.05)
        with pytest.raises(bl.NotContractionError, match=r"grew from .* over 100 steps.*inner_step_size must be "
                                                         r"< 2/L.*lower it"):
            bad.run(lam0, 1)
        # an honest step: one outer step is λ − lr·∇F(λ) with the closed-form ∇F
        good = solver(outer_loss, torch.zeros(D, dtype=DT), inner_loss=_g, lr=0.1, inner_steps=300,
                      inner_step_size=1.9)
        state, _ = good.run(lam0, 1)
        assert torch.allclose(state.hparams, lam0 - 0.1 * EXACT, rtol=0, atol=1e-9)


def test_nsid_reports_a_step_size_on_a_map_that_is_not_a_contraction():
    def batch_loss(w, lam, batch):
        return inner_loss(w, lam, batch)

    identity = lambda u, lam, eta: u  # noqa: E731  (G = id: Φ = T, the gradient step)
    mean = torch.zeros(1, D, dtype=DT)  # the exact map
    outer = lambda w, lam: outer_loss(w, lam)  # noqa: E731
    # a step 2.05/L inside the map: ∂_wΦ = I − 2.05 H has an eigenvalue −1.05
    bad = N.proximal_gradient_composite(batch_loss, identity, 2.05)
    for seed in range(5):
        with pytest.raises(bl.NotContractionError, match=r"NSID.*grew from .* over 100 steps.*step inside the map"):
            N.nsid(outer, W_STAR, LAM, Noise(seed), fixed_point=bad, mean_batch=mean, steps=100, step_size=1.0)
    # averaging with η = 1/2 turns it into a contraction (factor 0.5 − 0.5·1.05): the right number
    hg = N.nsid(outer, W_STAR, LAM, Noise(0, sigma=0.0), fixed_point=bad, mean_batch=mean, steps=100,
                step_size=0.5)
    assert _rel(hg, EXACT) < 1e-10
    good = N.proximal_gradient_composite(batch_loss, identity, 1.0)
    hg = N.nsid(outer, W_STAR, LAM, Noise(0, sigma=0.0), fixed_point=good, mean_batch=mean, steps=200,
                step_size=1.0)
    assert _rel(hg, EXACT) < 1e-10
    # the stochastic inner solver that feeds it: the same step
    with pytest.raises(bl.NotContractionError, match=r"grew from .* over 200 steps.*must be < 2/L.*lower step_size"):
        N.stochastic_proximal_gradient(torch.zeros(D, dtype=DT), LAM, Noise(3), batch_loss=batch_loss,
                                       prox=identity, steps=200, step_size=2.05)
    w = N.stochastic_proximal_gradient(torch.zeros(D, dtype=DT), LAM, Noise(3), batch_loss=batch_loss,
                                       prox=identity, steps=200, step_size=bl.DecreasingStep(5.0, 5.0))
    assert _rel(w, W_STAR) < 0.05


# ----------------------------------------------------------------------------- 2. empty batches


def test_batches_with_zero_rows_are_refused():
    empty = torch.zeros(0, D, dtype=DT)
    ok = torch.zeros(4, D, dtype=DT)
    data = [ok, ok, empty, ok]
    with pytest.raises(ValueError, match=r"batch 3 .*0 rows.*zero gradient"):
        bl.sid(outer_loss, torch.zeros(D, dtype=DT), LAM, data, inner_loss=inner_loss, outer_batches=[None],
               inner_steps=5, linear_steps=5)
    with pytest.raises(ValueError, match=r"0 rows"):
        bl.sid(outer_loss, torch.zeros(D, dtype=DT), LAM, [ok], inner_loss=inner_loss, outer_batches=[empty],
               inner_steps=5, linear_steps=5)
    with pytest.raises(ValueError, match=r"0 rows"):
        bl.stochastic_fixed_point(torch.zeros(D, dtype=DT), LAM, data, fixed_point=fixed_point, steps=5)
    comp = N.proximal_gradient_composite(inner_loss, lambda u, lam, eta: u, 1.0)
    outer = lambda w, lam: outer_loss(w, lam)  # noqa: E731
    with pytest.raises(ValueError, match=r"0 rows"):
        N.nsid(outer, W_STAR, LAM, data, fixed_point=comp, mean_batch=ok, steps=5, step_size=1.0)
    with pytest.raises(ValueError, match=r"nsid: mean_batch.*0 rows"):
        N.nsid(outer, W_STAR, LAM, [ok], fixed_point=comp, mean_batch=empty, steps=5, step_size=1.0)
    with pytest.raises(ValueError, match=r"0 rows"):
        N.stochastic_proximal_gradient(torch.zeros(D, dtype=DT), LAM, data, batch_loss=inner_loss,
                                       prox=lambda u, lam, eta: u, steps=5, step_size=1.0)
    solver = bl.StochasticBilevel(outer_loss, torch.zeros(D, dtype=DT), data, inner_loss=inner_loss,
                                  outer_batches=[None], inner_steps=2, linear_steps=2)
    with pytest.raises(ValueError, match=r"0 rows"):
        solver.run(LAM, 1)


# ----------------------------------------------------------------------------- 3. FISTA's step


def _lasso():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(50, 8, generator=g, dtype=DT)
    y = X @ torch.cat([2 * torch.randn(4, generator=g, dtype=DT), torch.zeros(4, dtype=DT)])
    y = y + 0.5 * torch.randn(50, generator=g, dtype=DT)
    L = torch.linalg.eigvalsh(X.T @ X / 50).max().item()

    def phi(step):
        return P.proximal_gradient(lambda w, th: 0.5 * ((X @ w - y) ** 2).mean(),
                                   lambda u, th, eta: P.soft_threshold(u, eta * th.exp()), step)

    return phi, L


def test_fista_with_a_step_between_1_and_2_over_L_blames_the_momentum_not_the_map():
    phi, L = _lasso()
    theta = torch.tensor(-3.0, dtype=DT)
    w_ref, info = N.fista(phi(1 / L), torch.zeros(8, dtype=DT), theta, tol=1e-13)
    assert info.converged
    fast = phi(1.8 / L)
    assert fast.contraction(torch.zeros(8, dtype=DT), theta) < 1  # Φ IS a contraction at 1.8/L
    with pytest.raises(bl.NotContractionError, match=r"Φ IS a contraction.*FISTA's momentum needs step ≤ 1/L.*"
                                                     r"Picard"):
        N.fista(fast, torch.zeros(8, dtype=DT), theta)
    # the advice works: Φ's plain iteration at 1.8/L reaches the same Lasso solution
    w, pinfo = bl.fixed_point_solve(lambda w: fast(w, theta), torch.zeros(8, dtype=DT),
                                    bl.Picard(maxiter=5000, tol=1e-13))
    assert pinfo.converged and torch.allclose(w, w_ref, atol=1e-10)
    # where the momentum neither converges nor diverges, the warning gives the same advice
    with pytest.warns(bl.ConvergenceWarning, match=r"stopped after 300 iterations.*FISTA's momentum needs step ≤ 1/L"):
        N.fista(phi(1.5 / L), torch.zeros(8, dtype=DT), theta, maxiter=300)


def test_fista_stopped_above_tol_warns():
    phi, L = _lasso()
    with pytest.warns(bl.ConvergenceWarning, match=r"fista: FISTA stopped after 5 iterations with relative residual"):
        _, info = N.fista(phi(1 / L), torch.zeros(8, dtype=DT), torch.tensor(-3.0, dtype=DT), maxiter=5)
    assert not info.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.ConvergenceWarning)
        N.fista(phi(1 / L), torch.zeros(8, dtype=DT), torch.tensor(-3.0, dtype=DT))  # converges: silent


# ----------------------------------------------------------------------------- 4. booleans


def test_booleans_are_not_counts_tolerances_or_steps():
    w0 = torch.zeros(D, dtype=DT)
    kw = dict(inner_loss=inner_loss, outer_batches=[None])
    bad_calls = [
        lambda: bl.ConstantStep(True),
        lambda: bl.DecreasingStep(True, 1.0),
        lambda: bl.DecreasingStep(1.0, True),
        lambda: bl.sid(outer_loss, w0, LAM, Noise(0), inner_steps=True, **kw),
        lambda: bl.sid(outer_loss, w0, LAM, Noise(0), linear_steps=True, **kw),
        lambda: bl.sid(outer_loss, w0, LAM, Noise(0), hparam_batches=True, **kw),
        lambda: bl.sid(outer_loss, w0, LAM, Noise(0), inner_step_size=True, **kw),
        lambda: bl.sid(outer_loss, w0, LAM, Noise(0), linear_step_size=True, **kw),
        lambda: bl.stochastic_fixed_point(w0, LAM, Noise(0), inner_loss=inner_loss, steps=True),
        lambda: bl.stochastic_fixed_point(w0, LAM, Noise(0), inner_loss=inner_loss, step_size=True),
        lambda: N.fista(_lasso()[0](0.1), torch.zeros(8, dtype=DT), torch.tensor(-3.0, dtype=DT), maxiter=True),
        lambda: N.fista(_lasso()[0](0.1), torch.zeros(8, dtype=DT), torch.tensor(-3.0, dtype=DT), tol=True),
        lambda: N.stochastic_proximal_gradient(w0, LAM, Noise(0), batch_loss=inner_loss,
                                               prox=lambda u, lam, eta: u, steps=True, step_size=1.0),
        lambda: N.stochastic_proximal_gradient(w0, LAM, Noise(0), batch_loss=inner_loss,
                                               prox=lambda u, lam, eta: u, steps=5, step_size=True),
        lambda: N.nsid(lambda w, lam: outer_loss(w, lam), W_STAR, LAM, Noise(0),
                       fixed_point=N.proximal_gradient_composite(inner_loss, lambda u, lam, eta: u, 1.0),
                       mean_batch=torch.zeros(1, D, dtype=DT), steps=True),
        lambda: N.nsid(lambda w, lam: outer_loss(w, lam), W_STAR, LAM, Noise(0),
                       fixed_point=N.proximal_gradient_composite(inner_loss, lambda u, lam, eta: u, 1.0),
                       mean_batch=torch.zeros(1, D, dtype=DT), steps=5, step_size=True),
    ]
    for name in ("lr", "inner_steps", "linear_steps", "hparam_batches", "inner_step_size", "linear_step_size"):
        bad_calls.append(lambda name=name: bl.StochasticBilevel(outer_loss, w0, Noise(0), inner_loss=inner_loss,
                                                                **{name: True}))
    for solver in (bl.AIDBilevel, bl.ITDBilevel):
        for name in ("lr", "inner_steps", "inner_step_size", "data_size"):
            bad_calls.append(lambda solver=solver, name=name: solver(outer_loss, w0, inner_loss=_g, **{name: True}))
        bad_calls.append(lambda solver=solver: solver(outer_loss, w0, inner_loss=_g).run(LAM, True))
    bad_calls.append(lambda: bl.ITDBilevel(outer_loss, w0, inner_loss=_g, truncate=True))
    for i, call in enumerate(bad_calls):
        with pytest.raises(ValueError, match="True") as err:
            call()
        assert "should be" in str(err.value), (i, err.value)

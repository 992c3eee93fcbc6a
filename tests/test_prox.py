"""Proximal operators and the proximal-gradient fixed point: Jacobians vs closed forms,
Lasso hypergradients (AID and ITD) vs the closed-form solution on the support, elastic net,
group Lasso and a box-constrained problem vs finite differences, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from problems import rel_err

import bilevel
from bilevel import nonsmooth as N
from bilevel import prox as P

torch.set_default_dtype(torch.float64)  # module data at import; conftest.py scopes it per test

NONSYMMETRIC = [
    bilevel.GMRES(maxiter=200, tol=1e-14),
    bilevel.FixedPoint(maxiter=5000, tol=1e-14),
    bilevel.NormalCG(maxiter=500, tol=1e-14),
    bilevel.Dense(),
]


# ----------------------------------------------------------------------------- operators


def test_soft_threshold_values_and_jacobian():
    u = torch.tensor([0.3, -1.0, 0.5, 2.0, -0.5, 0.0])
    t = torch.tensor(0.5)
    out = P.soft_threshold(u, t)
    assert torch.equal(out, torch.tensor([0.0, -0.5, 0.0, 1.5, 0.0, 0.0]))
    ju, jt = torch.func.jacrev(P.soft_threshold, argnums=(0, 1))(u, t)
    active = u.abs() > t  # the ties ±0.5 count as zeroed: derivative 0
    assert torch.equal(ju, torch.diag(active.to(u.dtype)))
    assert torch.equal(jt, torch.where(active, -torch.sign(u), 0.0))


def test_elastic_net_prox_is_the_argmin():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(7, generator=g)
    l1, l2 = 0.4, 0.7
    x = P.prox_elastic_net(u, l1, l2)
    # optimality of ½‖x − u‖² + l1‖x‖₁ + l2/2‖x‖²: on x≠0, x − u + l1 sign x + l2 x = 0; else |u| ≤ l1
    nz = x != 0
    assert torch.allclose((x - u + l1 * torch.sign(x) + l2 * x)[nz], torch.zeros(int(nz.sum())), atol=1e-15)
    assert bool((u[~nz].abs() <= l1).all())
    jac = torch.func.jacrev(lambda a, b: P.prox_elastic_net(u, a, b), argnums=(0, 1))
    ja, jb = jac(torch.tensor(l1), torch.tensor(l2))
    assert torch.allclose(ja, torch.where(nz, -torch.sign(u) / (1 + l2), 0.0))
    assert torch.allclose(jb, -x / (1 + l2))


def test_group_lasso_prox_values_and_jacobian():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(9, generator=g)
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    t = torch.tensor([0.3, 5.0, 0.8])  # group 1 is zeroed
    x = P.prox_group_lasso(u, t, groups)
    for gid in range(3):
        m = groups == gid
        nu = u[m].norm()
        expect = u[m] * max(0.0, 1 - t[gid].item() / nu.item())
        assert torch.allclose(x[m], expect, atol=1e-15)
    ju, jt = torch.func.jacrev(P.prox_group_lasso, argnums=(0, 1))(u, t, groups)
    for gid in range(3):
        m = groups == gid
        ug, nu = u[m], u[m].norm()
        if nu > t[gid]:
            k = int(m.sum())
            # d/du [u (1 − t/‖u‖)] = (1 − t/‖u‖) I + t u uᵀ/‖u‖³
            expect = (1 - t[gid] / nu) * torch.eye(k) + t[gid] * torch.outer(ug, ug) / nu**3
            assert torch.allclose(ju[m][:, m], expect, atol=1e-14)
            assert torch.allclose(jt[m, gid], -ug / nu, atol=1e-14)
        else:
            assert torch.equal(ju[m], torch.zeros(int(m.sum()), 9))
    # a zero group and a scalar threshold: no NaN in the derivative
    u0 = torch.cat([torch.zeros(3), u[3:]])
    j0 = torch.func.jacrev(P.prox_group_lasso)(u0, 0.5, groups)
    assert bool(torch.isfinite(j0).all())


def test_box_projection_jacobian_closed_form():
    u = torch.tensor([-2.0, -1.0, 0.2, 1.0, 3.0, 0.9])
    lo = torch.tensor(-1.0)
    hi = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    x = P.project_box(u, lo, hi)
    assert torch.equal(x, torch.tensor([-1.0, -1.0, 0.2, 1.0, 1.0, 0.5]))
    ju, jlo, jhi = torch.func.jacrev(P.project_box, argnums=(0, 1, 2))(u, lo, hi)
    inside = (u > lo) & (u < hi)  # ties (u = -1, u = 1) count as clipped
    assert torch.equal(ju, torch.diag(inside.to(u.dtype)))
    assert torch.equal(jlo, (u <= lo).to(u.dtype))
    assert torch.equal(jhi, torch.diag((u >= hi).to(u.dtype)))
    assert torch.equal(P.project_nonnegative(u), u.clamp(min=0))
    jn = torch.func.jacrev(P.project_nonnegative)(torch.tensor([-1.0, 0.0, 2.0]))
    assert torch.equal(jn, torch.diag(torch.tensor([0.0, 0.0, 1.0])))


def _simplex_reference(u: torch.Tensor, s: float) -> torch.Tensor:
    """Bisection on τ: Σ max(u − τ, 0) = s (independent of the sort-based algorithm)."""
    lo, hi = u.min().item() - s, u.max().item()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (u - mid).clamp(min=0).sum().item() > s:
            lo = mid
        else:
            hi = mid
    return (u - 0.5 * (lo + hi)).clamp(min=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simplex_projection_values_and_jacobian(seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(8, generator=g)
    s = torch.tensor(1.3)
    x = P.project_simplex(u, s)
    assert torch.allclose(x, _simplex_reference(u, 1.3), atol=1e-12)
    assert abs(x.sum().item() - 1.3) < 1e-13 and bool((x >= 0).all())
    ju, js = torch.func.jacrev(P.project_simplex, argnums=(0, 1))(u, s)
    m = (x > 0).to(u.dtype)
    k = m.sum()
    assert torch.allclose(ju, torch.diag(m) - torch.outer(m, m) / k, atol=1e-14)
    assert torch.allclose(js, m / k, atol=1e-14)
    # batched rows project independently
    U = torch.randn(4, 5, generator=g)
    X = P.project_simplex(U)
    for i in range(4):
        assert torch.allclose(X[i], _simplex_reference(U[i], 1.0), atol=1e-12)


# ----------------------------------------------------------------------------- Lasso


def _lasso(per_feature: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, d = 60, 8
    w_true = torch.tensor([2.0, -1.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    X = torch.randn(n, d, generator=g)
    y = X @ w_true + 0.3 * torch.randn(n, generator=g)
    Xv = torch.randn(n, d, generator=g)
    yv = Xv @ w_true + 0.3 * torch.randn(n, generator=g)
    theta = torch.full((d,), -1.5) + 0.1 * torch.randn(d, generator=g) if per_feature else torch.tensor(-1.5)
    L = torch.linalg.eigvalsh(X.T @ X / n).max().item()

    def smooth(w, th):
        return 0.5 * ((X @ w - y) ** 2).mean()

    def outer(w, th):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    phi = P.proximal_gradient(smooth, lambda u, th, eta: P.soft_threshold(u, eta * th.exp()), 1 / L)
    w, info = N.fista(phi, torch.zeros(d), theta, tol=1e-14)
    assert info.converged
    # closed form on the support S: w_S = (X_SᵀX_S)⁻¹(X_Sᵀy − nλ_S·sign(w_S)), zero elsewhere
    S = w != 0
    s = torch.sign(w[S])
    lam = theta.exp() * torch.ones(d)
    XS = X[:, S]
    A = XS.T @ XS
    w_exact = torch.zeros(d)
    w_exact[S] = torch.linalg.solve(A, XS.T @ y - n * lam[S] * s)
    assert torch.allclose(w, w_exact, atol=1e-12)
    # non-degenerate: strict complementarity off the support, no zero on it
    corr = (X.T @ (X @ w_exact - y) / n).abs()
    assert bool((corr[~S] < 0.9 * lam[~S]).all()) and bool((w_exact[S].abs() > 1e-3).all())
    gS = torch.func.grad(outer)(w_exact, theta)[S]
    # dw_S/dθ_j = −n λ_j (X_SᵀX_S)⁻¹ e_j s_j  (j ∈ S);  0 for j ∉ S
    Ainv_g = torch.linalg.solve(A, gS)
    if per_feature:
        exact = torch.zeros(d)
        exact[S] = -n * lam[S] * s * Ainv_g
    else:
        exact = -n * lam[0] * (s @ Ainv_g)
    return phi, outer, w_exact, theta, exact


@pytest.mark.parametrize("per_feature", [False, True])
@pytest.mark.parametrize("solver", NONSYMMETRIC, ids=lambda s: type(s).__name__)
def test_lasso_aid_matches_closed_form(per_feature, solver):
    phi, outer, w, theta, exact = _lasso(per_feature)
    hg, info = bilevel.hypergrad(outer, w, theta, fixed_point=phi, solver=solver, return_info=True)
    assert info.converged
    assert rel_err(hg, exact) <= 1e-8


@pytest.mark.parametrize("per_feature", [False, True])
def test_lasso_itd_matches_closed_form(per_feature):
    phi, outer, w, theta, exact = _lasso(per_feature)
    th = theta.clone().requires_grad_()
    w_T = bilevel.unroll(phi, torch.zeros_like(w), th, 200)
    (hg,) = torch.autograd.grad(outer(w_T, th), th)
    assert rel_err(hg, exact) <= 1e-8
    if not per_feature:  # forward mode through the same piecewise-smooth map
        fh = bilevel.forward_hypergrad(outer, phi, torch.zeros_like(w), theta, 120)
        assert rel_err(fh, exact) <= 1e-8


def test_lasso_map_is_nonsymmetric_so_cg_is_refused():
    phi, outer, w, theta, _ = _lasso(False)
    with pytest.raises(ValueError, match="symmetric"):
        bilevel.hypergrad(outer, w, theta, fixed_point=phi, solver=bilevel.CG())


def test_lasso_zero_solution_keeps_the_autograd_path():
    # λ so large that w = 0: the hypergradient is exactly 0, which is right, and must not be
    # mistaken for an unused hparam (the prox keeps the path to λ).
    phi, outer, w, theta, _ = _lasso(False)
    big = torch.tensor(3.0)
    w0, _ = N.fista(phi, torch.zeros_like(w), big)
    assert torch.equal(w0, torch.zeros_like(w))
    hg = bilevel.hypergrad(outer, w0, big, fixed_point=phi, solver=bilevel.GMRES())
    assert hg.item() == 0.0


# ----------------------------------------------------------------------------- finite differences


def _regression(n=50, d=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.zeros(d)
    w_true[: d // 2] = torch.randn(d // 2, generator=g) * 2
    X = torch.randn(n, d, generator=g)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g)
    Xv = torch.randn(n, d, generator=g)
    yv = Xv @ w_true + 0.5 * torch.randn(n, generator=g)
    L = torch.linalg.eigvalsh(X.T @ X / n).max().item()
    return X, y, Xv, yv, L


def _check_vs_fd(phi, outer, theta, d, rtol=1e-6, h=1e-5):
    """AID (GMRES) vs central differences of F(θ) = f(w(θ), θ), w solved to 1e-15."""
    w = N.fista(phi, torch.zeros(d), theta, tol=1e-14)[0]
    hg = bilevel.hypergrad(outer, w, theta, fixed_point=phi, solver=bilevel.GMRES(tol=1e-13))
    fd = torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e.view(-1)[i] = h
        wp = N.fista(phi, w, theta + e, tol=1e-14)[0]
        wm = N.fista(phi, w, theta - e, tol=1e-14)[0]
        # the support must not change within ±h, else finite differences are meaningless
        assert torch.equal(wp != 0, w != 0) and torch.equal(wm != 0, w != 0)
        fd.view(-1)[i] = (outer(wp, theta + e) - outer(wm, theta - e)) / (2 * h)
    assert rel_err(hg, fd) <= rtol
    return w


def test_elastic_net_vs_finite_differences():
    X, y, Xv, yv, L = _regression()
    d = X.shape[1]

    def prox(u, th, eta):
        return P.prox_elastic_net(u, eta * th[0].exp(), eta * th[1].exp())

    phi = P.proximal_gradient(lambda w, th: 0.5 * ((X @ w - y) ** 2).mean(), prox, 1 / L)

    def outer(w, th):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    w = _check_vs_fd(phi, outer, torch.tensor([-1.0, -2.0]), d)
    assert 0 < int((w != 0).sum()) < d  # a real sparsity pattern, so the kinks matter


def test_group_lasso_vs_finite_differences():
    X, y, Xv, yv, L = _regression(n=60, d=9, seed=4)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])

    def prox(u, th, eta):
        return P.prox_group_lasso(u, eta * th.exp(), groups)

    phi = P.proximal_gradient(lambda w, th: 0.5 * ((X @ w - y) ** 2).mean(), prox, 1 / L)

    def outer(w, th):
        return 0.5 * ((Xv @ w - yv) ** 2).mean() + 0.01 * (w**2).sum()

    theta = torch.tensor([-2.0, -1.5, -0.3])
    w = _check_vs_fd(phi, outer, theta, 9)
    active = [bool((w[groups == k] != 0).any()) for k in range(3)]
    assert any(active) and not all(active)


def test_box_constrained_ridge_vs_finite_differences():
    # learn the ridge strength and the box's upper bound: hypergradients through both
    X, y, Xv, yv, L = _regression(n=40, d=6, seed=5)

    def smooth(w, th):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * th[0].exp() * (w**2).sum()

    phi = P.proximal_gradient(smooth, lambda u, th, eta: P.project_box(u, -0.5, th[1]), 1 / (L + 1))

    def outer(w, th):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    w = _check_vs_fd(phi, outer, torch.tensor([-2.0, 0.8]), 6)
    assert bool(((w == 0.8) | (w == -0.5)).any()) and bool(((w > -0.5) & (w < 0.8)).any())


# ----------------------------------------------------------------------------- bad input


def test_negative_or_nan_strengths_raise():
    u = torch.randn(4)
    with pytest.raises(ValueError, match="exp"):
        P.soft_threshold(u, -0.1)
    with pytest.raises(ValueError, match=">= 0"):
        P.soft_threshold(u, torch.tensor([0.1, -0.2, 0.1, 0.1]))
    with pytest.raises(ValueError):
        P.soft_threshold(u, torch.tensor(float("nan")))
    with pytest.raises(ValueError):
        P.prox_elastic_net(u, 0.1, -1.0)
    with pytest.raises(ValueError):
        P.prox_group_lasso(u, -1.0, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        P.project_simplex(u, 0.0)
    with pytest.raises(ValueError, match="empty"):
        P.project_box(u, 1.0, -1.0)
    with pytest.raises(ValueError, match="NaN"):
        P.project_box(u, float("nan"), 1.0)
    # through the map and hypergrad: a negative strength is refused, not silently used
    phi = P.proximal_gradient(lambda w, th: (w**2).sum(), lambda v, th, eta: P.soft_threshold(v, eta * th), 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        bilevel.hypergrad(lambda w, th: w.sum(), torch.ones(3), torch.tensor(-1.0), fixed_point=phi,
                          solver=bilevel.GMRES())


def test_bad_step_is_detected_with_a_clear_error():
    X, y, Xv, yv, L = _regression()
    smooth = lambda w, th: 0.5 * ((X @ w - y) ** 2).mean()  # noqa: E731
    prox = lambda u, th, eta: P.soft_threshold(u, eta * th.exp())  # noqa: E731
    with pytest.raises(ValueError, match="step"):
        P.proximal_gradient(smooth, prox, -0.1)
    with pytest.raises(ValueError, match="step"):
        P.proximal_gradient(smooth, prox, float("nan"))
    bad = P.proximal_gradient(smooth, prox, 2.5 / L)  # η·L = 2.5 ≥ 2
    assert bad.contraction(torch.zeros(8), torch.tensor(-1.0)) > 1
    with pytest.raises(ValueError, match=r"step ≤ 1/L"):
        N.fista(bad, torch.zeros(8), torch.tensor(-1.0))
    # a nonconvex smooth part: no step makes it a contraction
    concave = P.proximal_gradient(lambda w, th: -(w**2).sum(), prox, 0.1)
    with pytest.raises(ValueError, match="not convex"):
        N.fista(concave, torch.ones(8), torch.tensor(-1.0))


def test_nan_is_refused():
    X, y, Xv, yv, L = _regression()
    Xn = X.clone()
    Xn[3, 2] = float("nan")
    smooth = lambda w, th: 0.5 * ((Xn @ w - y) ** 2).mean()  # noqa: E731
    phi = P.proximal_gradient(smooth, lambda u, th, eta: P.soft_threshold(u, eta * th.exp()), 1 / L)
    with pytest.raises((ValueError, bilevel.NotContractionError), match="NaN"):
        N.fista(phi, torch.zeros(8), torch.tensor(-1.0))
    good = P.proximal_gradient(
        lambda w, th: 0.5 * ((X @ w - y) ** 2).mean(),
        lambda u, th, eta: P.soft_threshold(u, eta * th.exp()),
        1 / L,
    )
    with pytest.raises(ValueError, match="NaN"):
        bilevel.hypergrad(lambda w, th: w.sum(), torch.full((8,), math.nan), torch.tensor(-1.0),
                          fixed_point=good, solver=bilevel.GMRES())
    with pytest.raises(ValueError, match="NaN"):
        N.fista(good, torch.zeros(8), torch.tensor(math.nan))


def test_fista_and_closed_form_gradient_agree_with_picard():
    X, y, Xv, yv, L = _regression(n=40, d=8, seed=6)
    X = X.clone()
    X[:, 1] = X[:, 0] + 0.05 * X[:, 1]  # ill-conditioned: Picard needs many more steps

    def prox(u, th, eta):
        return P.prox_elastic_net(u, eta * th[0].exp(), eta * th[1].exp())

    L = torch.linalg.eigvalsh(X.T @ X / 40).max().item()
    by_autograd = P.proximal_gradient(lambda w, th: 0.5 * ((X @ w - y) ** 2).mean(), prox, 1 / L)
    G, c = X.T @ X / 40, X.T @ y / 40
    closed = P.proximal_gradient(None, prox, 1 / L, smooth_grad=lambda w, th: G @ w - c)
    theta = torch.tensor([-2.5, -4.0])
    w1 = torch.zeros(8)
    k = 0
    while k < 100_000:  # plain Picard iteration, for reference
        k += 1
        w_next = by_autograd(w1, theta)
        if (w_next - w1).norm() <= 1e-14 * w_next.norm():
            break
        w1 = w_next
    w2, i2 = N.fista(closed, torch.zeros(8), theta, tol=1e-13)
    assert i2.converged and i2.iterations < k / 3
    assert torch.allclose(w1, w2, atol=1e-10)
    assert torch.allclose(by_autograd(w2, theta), closed(w2, theta), atol=1e-14)

    def outer(w, th):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    h1 = bilevel.hypergrad(outer, w2, theta, fixed_point=by_autograd, solver=bilevel.Dense())
    h2 = bilevel.hypergrad(outer, w2, theta, fixed_point=closed, solver=bilevel.GMRES())
    assert rel_err(h2, h1) <= 1e-10
    with pytest.raises(ValueError, match="exactly one"):
        P.proximal_gradient(None, prox, 0.1)
    with pytest.raises(TypeError, match="ProximalGradient"):
        N.fista(lambda w, th: w, torch.zeros(2), torch.zeros(1))
    with pytest.raises(bilevel.NotContractionError, match="NaN"):  # NaN in the data
        Xn = X.clone()
        Xn[0, 0] = math.nan
        N.fista(P.proximal_gradient(lambda w, th: 0.5 * ((Xn @ w - y) ** 2).mean(), prox, 1 / L),
                torch.zeros(8), theta)
    with pytest.raises(ValueError, match="step"):
        N.fista(P.proximal_gradient(None, prox, 3 / L, smooth_grad=lambda w, th: G @ w - c),
                torch.zeros(8), theta)


def test_lasso_through_the_implicit_decorator():
    # the same map as a fixed_point of bilevel.implicit, FISTA as the decorated solver
    phi, outer, w, theta, exact = _lasso(True)

    @bilevel.implicit(fixed_point=phi, solver=bilevel.GMRES(tol=1e-13))
    def solve(w0, th):
        return N.fista(phi, w0, th, tol=1e-14)[0]

    th = theta.clone().requires_grad_()
    (hg,) = torch.autograd.grad(outer(solve(torch.zeros_like(w), th), th), th)
    assert rel_err(hg, exact) <= 1e-8

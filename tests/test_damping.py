"""Solvers for inner problems that are not solved: damping ``(H + δI) v = b`` and truncated CG
(stop at negative curvature), each against a dense float64 answer."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import bilevel

D = 12


def _ridge(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, D, generator=g, dtype=torch.float64)
    y, yv = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    lam = torch.linspace(-2, 0, D, dtype=torch.float64)

    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w * w).sum()

    def outer(w, lam):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    H = X.T @ X / n + torch.diag(lam.exp())
    w = torch.linalg.solve(H, X.T @ y / n)
    return inner, outer, w, lam, H, Xv.T @ (Xv @ w - yv) / n


@pytest.mark.parametrize("solver", [bilevel.CG(tol=1e-12), bilevel.MINRES(tol=1e-12), bilevel.GMRES(tol=1e-12),
                                    bilevel.Dense(), bilevel.FixedPoint(maxiter=5000, tol=1e-12, step=0.5)])
@pytest.mark.parametrize("delta", [1e-3, 0.3])
def test_damped_hypergradient_is_the_damped_dense_solve(solver, delta):
    inner, outer, w, lam, H, fw = _ridge()
    v = torch.linalg.solve(H + delta * torch.eye(D, dtype=torch.float64), fw)
    exact = -lam.exp() * w * v
    got, info = bilevel.hypergrad(outer, w, lam, inner_loss=inner, solver=solver, damping=delta, return_info=True)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-13)
    assert info.damping == delta
    # and it is a bias: the undamped answer differs by about δ‖H⁻²‖‖∇_w f‖
    undamped = bilevel.hypergrad(outer, w, lam, inner_loss=inner, solver=solver)
    assert (undamped - got).norm() > 1e-4 * delta * undamped.norm()


def test_damping_in_fixed_point_form():
    inner, outer, w, lam, H, fw = _ridge()

    def phi(w, lam):
        return w - 0.5 * torch.func.grad(inner)(w, lam)

    got = bilevel.hypergrad(outer, w, lam, fixed_point=phi, solver=bilevel.GMRES(tol=1e-12), damping=0.2)
    v = torch.linalg.solve(0.5 * H + 0.2 * torch.eye(D, dtype=torch.float64), fw)  # (I − ∂Φ)ᵀ + δI
    torch.testing.assert_close(got, -0.5 * lam.exp() * w * v, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "0.1"])
def test_bad_damping_is_refused(bad):
    inner, outer, w, lam, *_ = _ridge()
    with pytest.raises((ValueError, TypeError), match="damping"):
        bilevel.hypergrad(outer, w, lam, inner_loss=inner, damping=bad)


def _indefinite(seed=0, n=10):
    """A symmetric A with two negative eigenvalues, and b mostly in its positive part."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.cat([torch.tensor([-0.5, -0.1], dtype=torch.float64),
                     torch.linspace(1, 10, n - 2, dtype=torch.float64)])
    A = Q @ torch.diag(eig) @ Q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return A, b


def test_cg_refuses_negative_curvature_by_default():
    A, b = _indefinite()
    with pytest.raises(bilevel.SolverError, match="non-positive curvature"):
        bilevel.solve(lambda x: A @ x, b, bilevel.CG(tol=1e-10))


def test_truncated_cg_stops_at_negative_curvature_and_says_so():
    A, b = _indefinite()
    with pytest.warns(bilevel.ConvergenceWarning, match="negative curvature"):
        x, info = bilevel.solve(lambda x: A @ x, b, bilevel.CG(tol=1e-10, on_negative_curvature="stop"))
    assert info.negative_curvature is True and not info.converged
    # the iterate is CG's after `iterations` steps: the Galerkin solution on that Krylov space
    k = info.iterations
    assert 1 <= k < 10
    K = torch.stack([torch.linalg.matrix_power(A, i) @ b for i in range(k)], 1)
    Qk, _ = torch.linalg.qr(K)
    galerkin = Qk @ torch.linalg.solve(Qk.T @ A @ Qk, Qk.T @ b)
    torch.testing.assert_close(x, galerkin, rtol=1e-8, atol=1e-10)
    # and it reports the true residual of what it returns
    assert abs(info.residual - float((b - A @ x).norm() / b.norm())) < 1e-10


def test_truncated_cg_on_a_definite_system_is_plain_cg():
    A, b = _indefinite()
    A = A + 1.0 * torch.eye(10, dtype=torch.float64)  # eigenvalues ≥ 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = bilevel.solve(lambda x: A @ x, b, bilevel.CG(tol=1e-12, on_negative_curvature="stop"))
    assert info.negative_curvature is False and info.converged
    torch.testing.assert_close(x, torch.linalg.solve(A, b))


def test_truncated_cg_under_vmap_stops_only_the_indefinite_rows():
    A1, b1 = _indefinite(0)
    A2 = A1 + 1.0 * torch.eye(10, dtype=torch.float64)
    As, bs = torch.stack([A1, A2]), torch.stack([b1, b1])

    def one(A, b):
        return bilevel.solve(lambda x: A @ x, b, bilevel.CG(maxiter=50, tol=1e-12, on_negative_curvature="stop"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
        xs, info = torch.vmap(one)(As, bs)
    assert info.negative_curvature.tolist() == [True, False]
    torch.testing.assert_close(xs[1], torch.linalg.solve(A2, b1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
        x1, _ = one(A1, b1)
    torch.testing.assert_close(xs[0], x1)  # the stopped row is the unbatched truncated iterate


def test_on_negative_curvature_is_checked():
    with pytest.raises(ValueError, match="on_negative_curvature"):
        bilevel.CG(on_negative_curvature="ignore")


def _mlp_not_solved(seed=0):
    """A 2-layer tanh regression net after a few GD steps: H indefinite at params."""
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randn(64, 5, generator=g, dtype=torch.float64)
    y, yv = torch.sin(X.sum(1)), torch.sin(Xv.sum(1))
    sizes, shapes = [40, 8, 8, 1], [(5, 8), (8,), (8, 1), (1,)]

    def net(w, A):
        W1, b1, W2, b2 = (t.reshape(s) for t, s in zip(torch.split(w, sizes), shapes))
        return (torch.tanh(A @ W1 + b1) @ W2).squeeze(-1) + b2

    def inner(w, lam):
        return 0.5 * ((net(w, X) - y) ** 2).mean() + 0.5 * lam.exp() * (w * w).sum()

    def outer(w, lam):
        return 0.5 * ((net(w, Xv) - yv) ** 2).mean()

    lam = torch.tensor(-6.0, dtype=torch.float64)
    w = torch.randn(57, generator=g, dtype=torch.float64) * 1.5
    for _ in range(5):
        w = w - 0.05 * torch.func.grad(inner)(w, lam)
    H = torch.func.hessian(inner)(w, lam)
    return inner, outer, w, lam, H


def test_damping_makes_cg_work_on_an_indefinite_network_hessian():
    inner, outer, w, lam, H = _mlp_not_solved()
    eig = torch.linalg.eigvalsh(H)
    assert eig.min() < 0  # the situation damping is for
    with pytest.raises(bilevel.SolverError, match="non-positive curvature"):
        bilevel.hypergrad(outer, w, lam, inner_loss=inner, inner_tol=math.inf)
    delta = 2 * float(-eig.min())  # H + δI positive definite
    got = bilevel.hypergrad(outer, w, lam, inner_loss=inner, inner_tol=math.inf, damping=delta,
                            solver=bilevel.CG(maxiter=200, tol=1e-12))
    fw = torch.func.grad(outer)(w, lam)
    v = torch.linalg.solve(H + delta * torch.eye(57, dtype=torch.float64), fw)
    mixed = torch.func.jacrev(torch.func.grad(inner), argnums=1)(w, lam)  # ∂_λ ∇_w g
    torch.testing.assert_close(got, -(mixed @ v), rtol=1e-8, atol=1e-12)

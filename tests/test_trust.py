"""The trust policy of the linear solves and of hypergrad: each root cause of a silent wrong
number has a test that asserts the right number or the specific error / warning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import bilevel as bl

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ridge(seed: int = 0, n: int = 40, d: int = 6):
    g = _gen(seed)
    X, y = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    Xv, yv = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    lam = 0.3 * torch.randn(d, generator=g, dtype=F64)

    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam.exp() * w * w).sum()

    def outer(w, lam):
        return 0.5 * ((Xv @ w - yv) ** 2).sum()

    def w_star(lam):
        return torch.linalg.solve(X.T @ X + torch.diag(lam.exp()), X.T @ y)

    return inner, outer, w_star, lam


def _linear_map(rho: float, seed: int = 0, d: int = 6):
    """Φ(w, λ) = A w + λ with A non-symmetric, spectral radius ``rho``."""
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.linspace(-rho, rho, d, dtype=F64)) @ Q.T
    A = A + 0.05 * torch.triu(torch.randn(d, d, generator=g, dtype=F64), 1)  # non-normal
    A = A * (rho / torch.linalg.eigvals(A).abs().max())
    lam = torch.randn(d, generator=g, dtype=F64)
    target = torch.randn(d, generator=g, dtype=F64)
    w = torch.linalg.solve(torch.eye(d, dtype=F64) - A, lam)
    return A, lam, target, w


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------- 1. slow divergence


@pytest.mark.parametrize("rho", [1.02, 1.05, 1.1])
@pytest.mark.parametrize("solver", [bl.FixedPoint(maxiter=100), bl.Neumann(maxiter=100)], ids=["FixedPoint", "Neumann"])
def test_slowly_diverging_fixed_point_raises(rho, solver):
    A, lam, target, w = _linear_map(rho)
    with pytest.raises(bl.NotContractionError, match="not a contraction"):
        bl.hypergrad(lambda w, lam: ((w - target) ** 2).sum(), w, lam,
                     fixed_point=lambda w, lam: A @ w + lam, solver=solver)


def test_inner_loss_with_a_step_above_two_over_L_raises():
    inner, outer, w_star, lam = _ridge()
    X_L = float(torch.linalg.eigvalsh(torch.func.hessian(lambda w: inner(w, lam))(w_star(lam))).max())
    with pytest.raises(bl.NotContractionError, match="step"):
        bl.hypergrad(outer, w_star(lam), lam, inner_loss=inner, solver=bl.FixedPoint(step=2.05 / X_L, maxiter=200))


def test_slow_contraction_that_runs_out_of_iterations_warns_and_is_not_an_error():
    A, lam, target, w = _linear_map(0.98)
    with pytest.warns(bl.ConvergenceWarning, match="FixedPoint stopped after 20 iterations"):
        bl.hypergrad(lambda w, lam: ((w - target) ** 2).sum(), w, lam,
                     fixed_point=lambda w, lam: A @ w + lam, solver=bl.FixedPoint(maxiter=20))


def test_contraction_gets_the_closed_form():
    A, lam, target, w = _linear_map(0.9)
    eye = torch.eye(len(lam), dtype=F64)
    exact = torch.linalg.solve((eye - A).T, 2 * (w - target))  # dF/dλ = (I − A)⁻ᵀ ∇_w f
    for solver in (bl.FixedPoint(maxiter=2000, tol=1e-13), bl.GMRES(tol=1e-13), bl.NormalCG(tol=1e-13, maxiter=500)):
        hg = bl.hypergrad(lambda w, lam: ((w - target) ** 2).sum(), w, lam,
                          fixed_point=lambda w, lam: A @ w + lam, solver=solver)
        assert _rel(hg, exact) < 1e-9, solver


# --------------------------------------------------------------------- 2. unconverged solves warn


def test_hypergrad_warns_when_the_linear_solve_did_not_converge():
    inner, outer, w_star, lam = _ridge()
    lam = lam - 12  # tiny penalties: ill-conditioned H
    with pytest.warns(bl.ConvergenceWarning, match=r"hypergrad: CG stopped after 2 iterations with relative residual"):
        bl.hypergrad(outer, w_star(lam), lam, inner_loss=inner, solver=bl.CG(maxiter=2))


def test_the_warning_becomes_an_error_under_a_filter_and_tol0_does_not_warn():
    inner, outer, w_star, lam = _ridge()
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.ConvergenceWarning)
        with pytest.raises(bl.ConvergenceWarning):
            bl.hypergrad(outer, w_star(lam), lam, inner_loss=inner, solver=bl.CG(maxiter=1))
        bl.hypergrad(outer, w_star(lam), lam, inner_loss=inner, solver=bl.CG(maxiter=1, tol=0.0))  # asked for
        bl.hypergrad(outer, w_star(lam), lam, inner_loss=inner)  # converged: silent


def test_solve_warns_when_not_converged():
    A = torch.diag(torch.logspace(0, -6, 30, dtype=F64))
    with pytest.warns(bl.ConvergenceWarning, match="solve: GMRES"):
        bl.solve(lambda x: A @ x, torch.ones(30, dtype=F64), bl.GMRES(maxiter=5))


# --------------------------------------------------------------------- 3. singular systems


@pytest.mark.parametrize("solver", [bl.GMRES(), bl.MINRES(), bl.CG(), bl.NormalCG(), bl.Dense()],
                         ids=lambda s: type(s).__name__)
def test_singular_inconsistent_system_raises(solver):
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    with pytest.raises(bl.SingularSystemError, match="singular and inconsistent"):
        bl.solve(lambda x: A @ x, torch.ones(2, dtype=F64), solver, rmatvec=lambda x: A.T @ x)


@pytest.mark.parametrize("solver", [bl.GMRES(), bl.MINRES()], ids=lambda s: type(s).__name__)
def test_singular_consistent_system_is_solved(solver):
    A = torch.diag(torch.tensor([2.0, 0.0, 3.0], dtype=F64))
    x, info = bl.solve(lambda x: A @ x, torch.tensor([1.0, 0.0, 1.0], dtype=F64), solver)
    assert info.converged and torch.allclose(x, torch.tensor([0.5, 0.0, 1 / 3], dtype=F64), atol=1e-12)


@pytest.mark.parametrize("solver", [bl.CG(), bl.MINRES(), bl.GMRES(), bl.Dense()], ids=lambda s: type(s).__name__)
def test_dead_unit_in_hypergrad_raises(solver):
    # params[-1] reaches the outer loss but not the inner loss: its row of H is zero
    inner, outer, w_star, lam = _ridge()
    w = torch.cat([w_star(lam), torch.zeros(1, dtype=F64)])

    def inner2(w, lam):
        return inner(w[:-1], lam)

    def outer2(w, lam):
        return outer(w[:-1], lam) + w[-1] * 3.0

    with pytest.raises(bl.SingularSystemError, match="dead unit"):
        bl.hypergrad(outer2, w, lam, inner_loss=inner2, solver=solver)


# --------------------------------------------------------------------- 4. true residuals


@pytest.mark.parametrize("solver", [bl.MINRES(maxiter=60), bl.CG(maxiter=60), bl.GMRES(maxiter=60),
                                    bl.NormalCG(maxiter=60)], ids=lambda s: type(s).__name__)
def test_reported_residual_is_the_true_residual(solver):
    g = _gen(1)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.logspace(0, -10, 40, dtype=F64)) @ Q.T
    b = torch.randn(40, generator=g, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.ConvergenceWarning)
        x, info = bl.solve(lambda v: A @ v, b, solver, rmatvec=lambda v: A.T @ v)
    true = float((b - A @ x).norm() / b.norm())
    assert abs(info.residual - true) <= 0.1 * true + 1e-15
    assert info.converged == (true <= solver.tol)


# --------------------------------------------------------------------- 5. second order


def test_second_order_hypergradient_under_torch_func_and_autograd():
    inner, outer, w_star, lam = _ridge()
    H = torch.func.hessian(lambda h: outer(w_star(h), h))(lam)

    def hg(h):
        return bl.hypergrad(outer, w_star(h), h, inner_loss=inner, solver=bl.CG(tol=1e-13))

    assert _rel(torch.func.jacrev(hg)(lam), H) < 1e-8
    assert _rel(torch.func.jacfwd(hg)(lam), H) < 1e-8
    assert _rel(torch.func.grad(lambda h: hg(h).sum())(lam), H.sum(0)) < 1e-8
    lr = lam.clone().requires_grad_()
    out = bl.hypergrad(outer, w_star(lr), lr, inner_loss=inner, solver=bl.CG(tol=1e-13), create_graph=True)
    (row,) = torch.autograd.grad(out.sum(), lr)
    assert _rel(row, H.sum(0)) < 1e-8
    # without create_graph the result is detached: no graph held by Parameters
    assert not bl.hypergrad(outer, w_star(lr), lr, inner_loss=inner).requires_grad


# --------------------------------------------------------------------- 9. options


@pytest.mark.parametrize("make", [
    lambda: bl.CG(tol=True), lambda: bl.CG(maxiter=True), lambda: bl.GMRES(restart=True),
    lambda: bl.FixedPoint(step=True), lambda: bl.Neumann(tol=False), lambda: bl.MINRES(maxiter=2.0),
    lambda: bl.CG(tol=math.nan), lambda: bl.GMRES(restart=0),
], ids=range(8))
def test_bools_and_bad_numbers_are_refused(make):
    with pytest.raises(ValueError, match="should be"):
        make()


# --------------------------------------------------------------------- 10. inner residual


def test_params_far_from_the_inner_solution_warn_and_honest_runs_do_not():
    inner, outer, w_star, lam = _ridge()
    with pytest.warns(bl.ConvergenceWarning, match="far from the inner solution"):
        bl.hypergrad(outer, torch.zeros(6, dtype=F64), lam, inner_loss=inner)
    with pytest.warns(bl.ConvergenceWarning, match="far from the inner solution"):
        bl.hypergrad(outer, 0.8 * w_star(lam), lam, inner_loss=inner)
    with pytest.warns(bl.ConvergenceWarning, match="inner_tol"):
        bl.hypergrad(outer, w_star(lam) + 1e-4, lam, inner_loss=inner, inner_tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.ConvergenceWarning)
        bl.hypergrad(outer, w_star(lam) * (1 + 1e-5), lam, inner_loss=inner)  # an honest, early-stopped inner
        bl.hypergrad(outer, torch.zeros(6, dtype=F64), lam, inner_loss=inner, inner_tol=math.inf)  # opted out


# --------------------------------------------------------------------- 11. checks under vmap


def test_checks_hold_under_vmap():
    A, lam, target, w = _linear_map(0.9)
    A_bad = A * (1.05 / 0.9)
    As = torch.stack([A, A, A_bad])
    lams, ws = lam.expand(3, -1), w.expand(3, -1)

    def one(A, w, lam):
        return bl.hypergrad(lambda w, lam: ((w - target) ** 2).sum(), w, lam,
                            fixed_point=lambda w, lam: A @ w + lam, solver=bl.FixedPoint(maxiter=200))

    with pytest.raises(bl.NotContractionError):
        torch.func.vmap(one)(As, ws, lams)
    good = torch.func.vmap(one)(As[:2], ws[:2], lams[:2])
    assert _rel(good[0], one(A, w, lam)) < 1e-12


def test_vmap_returns_info_and_warns_for_one_bad_task():
    inner, outer, w_star, lam = _ridge()
    lams = torch.stack([lam, lam + 0.1, lam - 14])  # the last is ill-conditioned
    W = torch.stack([w_star(x) for x in lams])

    def one(w, h):
        return bl.hypergrad(outer, w, h, inner_loss=inner, solver=bl.CG(maxiter=4), return_info=True)

    with pytest.warns(bl.ConvergenceWarning, match="CG stopped"):
        hg, info = torch.func.vmap(one)(W, lams)
    assert info.converged.shape == (3,) and not bool(info.converged[2])
    loop = torch.stack([bl.hypergrad(outer, w, h, inner_loss=inner, solver=bl.CG(maxiter=4))
                        for w, h in zip(W[:2], lams[:2])])
    assert _rel(hg[:2], loop) < 1e-10


def test_gmres_rows_that_converge_early_stay_put_under_vmap():
    g = _gen(5)
    A = torch.randn(3, 12, 12, generator=g, dtype=F64) * 0.2 + torch.eye(12, dtype=F64)
    b = torch.randn(3, 12, generator=g, dtype=F64)
    A[0] = torch.eye(12, dtype=F64) * 2.0  # converges in one step, the others need ~12

    def one(A, b):
        return bl.solve(lambda x: A @ x, b, bl.GMRES(tol=1e-12, restart=40))[0]

    got = torch.func.vmap(one)(A, b)
    assert _rel(got, torch.linalg.solve(A, b)) < 1e-10


def test_symmetric_fixed_point_with_cg_under_vmap():
    g = _gen(2)
    M = torch.randn(2, 5, 5, generator=g, dtype=F64)
    S = 0.4 * (M + M.transpose(1, 2)) / (M + M.transpose(1, 2)).norm(dim=(1, 2), keepdim=True)  # symmetric, ‖S‖ < 1
    lam = torch.randn(2, 5, generator=g, dtype=F64)
    w = torch.linalg.solve(torch.eye(5, dtype=F64) - S, lam)

    def one(S, w, lam, solver):
        return bl.hypergrad(lambda w, lam: (w ** 2).sum(), w, lam, fixed_point=lambda w, lam: S @ w + lam,
                            solver=solver)

    got = torch.func.vmap(lambda S, w, h: one(S, w, h, bl.CG(tol=1e-13)))(S, w, lam)
    exact = torch.linalg.solve(torch.eye(5, dtype=F64) - S, 2 * w)
    assert _rel(got, exact) < 1e-10
    N = S + 0.2 * torch.triu(torch.ones(5, 5, dtype=F64), 1)  # not symmetric
    with pytest.raises(ValueError, match="symmetric"):
        torch.func.vmap(lambda S, w, h: one(S, w, h, bl.CG()))(N, w, lam)


# --------------------------------------------------------------------- obscure errors made clear


def test_structure_mismatch_names_the_containers():
    A, lam, target, w = _linear_map(0.5)
    with pytest.raises(ValueError, match=r"tuple\(\*, \*\).*list\(\*, \*\)"):
        bl.hypergrad(lambda w, lam: (w[0] ** 2).sum(), (w[:3], w[3:]), lam,
                     fixed_point=lambda w, lam: [w[0] * 0.5, w[1] * 0.5 + lam[3:]])


def test_precond_of_the_wrong_shape_is_named():
    inner, outer, w_star, lam = _ridge()
    with pytest.raises(ValueError, match="precond"):
        bl.hypergrad(outer, w_star(lam), lam, inner_loss=inner, precond=lambda v: v[:-1])


def test_inference_mode_tensors():
    inner, outer, w_star, lam = _ridge()
    exact = bl.hypergrad(outer, w_star(lam), lam, inner_loss=inner)
    with torch.inference_mode():
        w_inf, lam_inf = w_star(lam).clone(), lam.clone()
    assert _rel(bl.hypergrad(outer, w_inf, lam_inf, inner_loss=inner), exact) < 1e-12
    with torch.inference_mode():
        scale = torch.ones(6, dtype=F64)
    with pytest.raises(RuntimeError, match="inference_mode"):
        bl.hypergrad(lambda w, h: outer(w * scale, h), w_star(lam), lam, inner_loss=lambda w, h: inner(w * scale, h))


def test_hypergrad_inside_torch_compile():
    inner, outer, w_star, lam = _ridge()
    exact = bl.hypergrad(outer, w_star(lam), lam, inner_loss=inner)

    def step(w, lam):
        return lam - 0.1 * bl.hypergrad(outer, w, lam, inner_loss=inner)

    got = torch.compile(step, backend="eager")(w_star(lam), lam)
    assert _rel(got, lam - 0.1 * exact) < 1e-12


def test_torch_compile_of_hypergrad_itself():
    inner, outer, w_star, lam = _ridge()
    exact = bl.hypergrad(outer, w_star(lam), lam, inner_loss=inner)
    got = torch.compile(bl.hypergrad, backend="eager")(outer, w_star(lam), lam, inner_loss=inner)
    assert _rel(got, exact) < 1e-12


def test_solve_info_under_vmap_is_per_task():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    b = torch.randn(4, 3, generator=_gen(0), dtype=F64)
    x, info = torch.func.vmap(lambda b: bl.solve(lambda v: A @ v, b, bl.CG()))(b)
    assert info.converged.shape == (4,) and bool(info.converged.all())
    assert _rel(x, b / torch.tensor([1.0, 2.0, 3.0], dtype=F64)) < 1e-12


def test_inner_solvers_under_torch_compile_match_eager():
    # compiled, lbfgs once returned a different (wrong) minimiser; now it runs eagerly
    inner, outer, w_star, lam = _ridge()
    w0 = torch.zeros(6, dtype=F64)
    for solve in (bl.lbfgs, bl.newton_cg):
        got = torch.compile(lambda h, solve=solve: solve(inner, w0, h)[0], backend="eager")(lam)
        assert _rel(got, w_star(lam)) < 1e-6, solve.__name__

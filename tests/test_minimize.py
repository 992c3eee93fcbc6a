"""newton_cg reaches the exact inner solution (closed form / Newton in float64)."""

import pytest
import torch
from problems import logistic, rel_err, ridge, ridge_dict

import bilevel as bl


@pytest.mark.parametrize("make", [ridge, logistic, ridge_dict], ids=lambda f: f.__name__)
def test_newton_cg_reaches_the_solution(make):
    p = make()
    w0 = torch.utils._pytree.tree_map(torch.zeros_like, p.params)
    w, info = bl.newton_cg(p.inner_loss, w0, p.hparams, tol=1e-13)
    assert info.converged and info.grad_norm < 1e-12
    assert rel_err(w, p.params) < 1e-10
    # and the hypergradient at that solution is exact
    assert rel_err(bl.hypergrad(p.outer_loss, w, p.hparams, inner_loss=p.inner_loss), p.exact) < 1e-9


def test_newton_cg_nonconvex_falls_back_and_descends():
    # double well: Hessian indefinite at the start (w = 0.1), minima at ±1
    loss = lambda w, lam: ((w**2 - 1) ** 2).sum() + lam * 0  # noqa: E731
    w, info = bl.newton_cg(loss, torch.full((3,), 0.1, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    assert info.converged and torch.allclose(w.abs(), torch.ones(3, dtype=torch.float64))


def test_newton_cg_bad_input():
    p = ridge()
    with pytest.raises(ValueError, match="inner_loss should return a scalar"):
        bl.newton_cg(lambda w, lam: w, p.params, p.hparams)
    with pytest.raises(ValueError, match="maxiter"):
        bl.newton_cg(p.inner_loss, p.params, p.hparams, maxiter=-1)
    with pytest.raises(ValueError, match="NaN"):
        bl.newton_cg(p.inner_loss, p.params * float("nan"), p.hparams)


@pytest.mark.parametrize("make", [ridge, logistic, ridge_dict], ids=lambda f: f.__name__)
def test_lbfgs_reaches_the_solution(make):
    p = make()
    w0 = torch.utils._pytree.tree_map(torch.zeros_like, p.params)
    w, info = bl.lbfgs(p.inner_loss, w0, p.hparams, tol=1e-13)
    assert info.converged and info.grad_norm < 1e-12 and info.hvps == 0
    assert info.evaluations >= info.iterations + 1
    assert rel_err(w, p.params) < 1e-10
    assert rel_err(bl.hypergrad(p.outer_loss, w, p.hparams, inner_loss=p.inner_loss), p.exact) < 1e-9


def test_lbfgs_on_rosenbrock_and_its_limits():
    # a curved valley: L-BFGS must keep only positive-curvature pairs and still converge
    def rosen(w, a):
        return (a - w[0]) ** 2 + 100.0 * (w[1] - w[0] ** 2) ** 2

    a = torch.tensor(1.0, dtype=torch.float64)
    w, info = bl.lbfgs(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64), a, tol=1e-12, maxiter=500)
    assert info.converged and torch.allclose(w, torch.ones(2, dtype=torch.float64), atol=1e-9)
    # maxiter reached: not converged, reported as such; maxiter=0 returns params0
    w1, info1 = bl.lbfgs(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64), a, maxiter=3)
    assert not info1.converged and info1.iterations == 3
    w0, info0 = bl.lbfgs(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64), a, maxiter=0)
    assert w0.tolist() == [-1.2, 1.0] and info0.iterations == 0


def test_lbfgs_bad_input():
    p = ridge()
    with pytest.raises(ValueError, match="inner_loss should return a scalar"):
        bl.lbfgs(lambda w, lam: w, p.params, p.hparams)
    with pytest.raises(ValueError, match="history"):
        bl.lbfgs(p.inner_loss, p.params, p.hparams, history=0)
    with pytest.raises(ValueError, match="NaN"):
        bl.lbfgs(p.inner_loss, p.params * float("nan"), p.hparams)
    with pytest.raises(bl.linear_solve.SolverError, match="NaN/Inf"):
        bl.lbfgs(lambda w, lam: (w.log() * lam[0]).sum(), -torch.ones(3, dtype=torch.float64), p.hparams)


def test_lbfgs_under_vmap_is_refused_or_matches_loop():
    # under torch.func transforms the solver uses torch.func; with data-dependent control
    # flow (line search) vmap cannot run it: the error must say so, not return garbage
    p = ridge()
    lams = torch.stack([p.hparams, p.hparams * 1.5])
    w0 = torch.zeros_like(p.params)
    with pytest.raises(RuntimeError):
        torch.func.vmap(lambda lam: bl.lbfgs(p.inner_loss, w0, lam)[0])(lams)


def test_lbfgs_inverse_hessian_preconditions_the_hypergradient():
    # the L-BFGS pairs approximate the inverse Hessian at the solution: as a CG
    # preconditioner the hypergradient is the same (exact) in fewer iterations
    from problems import _data, newton

    X, y = _data(200, 30, seed=5)[:2]
    X = X * torch.logspace(0, 1.5, 30, dtype=torch.float64)  # badly scaled features
    Xv, yv = _data(100, 30, seed=6)[:2]
    Xv = Xv * torch.logspace(0, 1.5, 30, dtype=torch.float64)
    lab, labv = torch.sign(y), torch.sign(yv)

    def inner(w, lam):
        return torch.nn.functional.softplus(-lab * (X @ w)).mean() + 0.5 * (lam.exp() * w * w).sum()

    def outer(w, lam):
        return torch.nn.functional.softplus(-labv * (Xv @ w)).mean()

    lam = torch.linspace(-4, -1, 30, dtype=torch.float64)
    w_star = newton(inner, torch.zeros(30, dtype=torch.float64), lam)
    H = torch.func.hessian(inner)(w_star, lam)
    gf = torch.func.grad(outer)(w_star, lam)
    exact = -lam.exp() * w_star * torch.linalg.solve(H, gf)
    w, info = bl.lbfgs(inner, torch.zeros(30, dtype=torch.float64), lam, tol=1e-12, history=20)
    assert rel_err(w, w_star) < 1e-9
    hv = info.inverse_hessian(gf)
    assert hv.shape == gf.shape and (hv @ gf).item() > 0
    solver = bl.CG(maxiter=200, tol=1e-10)
    plain, i_plain = bl.hypergrad(outer, w, lam, inner_loss=inner, solver=solver, return_info=True)
    pre, i_pre = bl.hypergrad(outer, w, lam, inner_loss=inner, solver=solver, precond=info.inverse_hessian,
                              return_info=True)
    assert rel_err(plain, exact) < 1e-8 and rel_err(pre, exact) < 1e-8
    assert i_pre.iterations < i_plain.iterations, (i_pre.iterations, i_plain.iterations)


@pytest.mark.parametrize("solver", ["newton_cg", "lbfgs"])
def test_torch_func_path_reaches_the_same_solution(solver, monkeypatch):
    # under torch.func transforms the solvers use torch.func closures instead of plain
    # autograd: forced here, the same solution
    import bilevel.minimize as mod

    p = logistic()
    w0 = torch.zeros_like(p.params)
    fn = getattr(bl, solver)
    plain, _ = fn(p.inner_loss, w0, p.hparams, tol=1e-13)
    monkeypatch.setattr(mod, "_plain_autograd", lambda *groups: False)
    func, info = fn(p.inner_loss, w0, p.hparams, tol=1e-13)
    assert info.converged
    assert rel_err(plain, p.params) < 1e-10 and rel_err(func, p.params) < 1e-10

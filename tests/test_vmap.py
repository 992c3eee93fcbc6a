"""A batch of tasks under torch.func.vmap equals the Python loop over the tasks (float64)."""

import pytest
import torch

import bilevel as bl

F64 = torch.float64
B, N, D = 6, 20, 5


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _tasks(seed=0):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(B, N, D, generator=g, dtype=F64), torch.randn(B, N, D, generator=g, dtype=F64)
    w_true = torch.randn(B, D, generator=g, dtype=F64)
    y = torch.einsum("bnd,bd->bn", X, w_true) + 0.3 * torch.randn(B, N, generator=g, dtype=F64)
    yv = torch.einsum("bnd,bd->bn", Xv, w_true) + 0.3 * torch.randn(B, N, generator=g, dtype=F64)
    lam = 0.5 * torch.randn(B, D, generator=g, dtype=F64)  # well conditioned: Richardson needs few steps
    return lam, X, y, Xv, yv


def ridge_inner(w, lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()


def ridge_outer(w, lam, Xv, yv):
    return 0.5 * ((Xv @ w - yv) ** 2).mean()


def ridge_closed_form(lam, X, y):
    return torch.linalg.solve(X.T @ X / X.shape[0] + torch.diag(lam.exp()), X.T @ y / X.shape[0])


def _loop(fn, *batched):
    return torch.stack([fn(*task) for task in zip(*batched, strict=True)])


def _lmax(lam, X):
    """Largest eigenvalue of any task's Hessian: FixedPoint/Neumann need step < 2/λ_max."""
    H = X.transpose(1, 2) @ X / N + torch.diag_embed(lam.exp())
    return torch.linalg.eigvalsh(H).max().item()


def _solvers(lam, X):
    eta = 1.0 / _lmax(lam, X)
    return [bl.FixedPoint(step=eta, maxiter=300, tol=1e-14), bl.Neumann(step=eta, maxiter=300, tol=1e-14),
            bl.CG(), bl.MINRES(), bl.GMRES(), bl.NormalCG(), bl.Dense()]


SOLVER_IDS = ["FixedPoint", "Neumann", "CG", "MINRES", "GMRES", "NormalCG", "Dense"]


@pytest.mark.parametrize("k", range(7), ids=SOLVER_IDS)
def test_hypergrad_vmap_equals_loop(k):
    lam, X, y, Xv, yv = _tasks()
    solver = _solvers(lam, X)[k]

    def task(lam, X, y, Xv, yv):
        w = ridge_closed_form(lam, X, y)
        return bl.hypergrad(lambda w, lam: ridge_outer(w, lam, Xv, yv), w, lam,
                            inner_loss=lambda w, lam: ridge_inner(w, lam, X, y), solver=solver)

    batched = torch.func.vmap(task)(lam, X, y, Xv, yv)
    looped = _loop(task, lam, X, y, Xv, yv)
    assert _rel(batched, looped) <= 1e-10
    # and both are the exact hypergradient (autograd through the dense solve)
    exact = _loop(lambda lam, X, y, Xv, yv: torch.func.grad(
        lambda lam: ridge_outer(ridge_closed_form(lam, X, y), lam, Xv, yv))(lam), lam, X, y, Xv, yv)
    assert _rel(looped, exact) <= 1e-10


@pytest.mark.parametrize("k", range(7), ids=SOLVER_IDS)
def test_implicit_solver_vmap_equals_loop(k):
    lam, X, y, Xv, yv = _tasks(1)
    solve = bl.implicit(inner_loss=ridge_inner, solver=_solvers(lam, X)[k])(
        lambda w0, lam, X, y: ridge_closed_form(lam, X, y))
    w0 = torch.zeros(D, dtype=F64)

    def task(lam, X, y, Xv, yv):
        return torch.func.grad(lambda lam: ridge_outer(solve(w0, lam, X, y), lam, Xv, yv))(lam)

    looped = _loop(task, lam, X, y, Xv, yv)
    assert _rel(torch.func.vmap(task)(lam, X, y, Xv, yv), looped) <= 1e-10
    # loss.backward() through the vmapped solver: the backward is vmapped too
    lam_ = lam.clone().requires_grad_()
    W = torch.func.vmap(solve, in_dims=(None, 0, 0, 0))(w0, lam_, X, y)
    torch.func.vmap(ridge_outer)(W, lam_, Xv, yv).sum().backward()
    assert _rel(lam_.grad, looped) <= 1e-10


def test_logistic_tasks_with_a_fixed_newton_solver():
    # meta-learning-like: one small logistic regression per task, a vmappable inner solver
    # (a fixed number of Newton steps, no data-dependent stopping)
    lam, X, y, Xv, yv = _tasks(2)
    y, yv = torch.sign(y), torch.sign(yv)

    def inner(w, lam, X, y):
        return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer(w, lam, Xv, yv):
        return torch.nn.functional.softplus(-yv * (Xv @ w)).mean()

    @bl.implicit(inner_loss=inner, solver=bl.CG(maxiter=50, tol=1e-13))
    def newton(w, lam, X, y):
        for _ in range(10):  # gradient and Hessian of inner in closed form
            s = torch.sigmoid(-y * (X @ w))
            grad = -X.T @ (y * s) / N + lam.exp() * w
            hess = X.T @ ((s * (1 - s))[:, None] * X) / N + torch.diag(lam.exp())
            w = w - torch.linalg.solve(hess, grad)
        return w

    w0 = torch.zeros(D, dtype=F64)

    def task(lam, X, y, Xv, yv):
        return torch.func.grad(lambda lam: outer(newton(w0, lam, X, y), lam, Xv, yv))(lam)

    looped = _loop(task, lam, X, y, Xv, yv)
    assert _rel(torch.func.vmap(task)(lam, X, y, Xv, yv), looped) <= 1e-10
    W = torch.func.vmap(newton, in_dims=(None, 0, 0, 0))(w0, lam, X, y)
    assert torch.func.vmap(torch.func.grad(inner))(W, lam, X, y).abs().max() < 1e-13  # solved
    # hypergrad at the same solutions, vmapped: equal too

    def hg(w, lam, X, y, Xv, yv):
        return bl.hypergrad(lambda w, lam: outer(w, lam, Xv, yv), w, lam,
                            inner_loss=lambda w, lam: inner(w, lam, X, y), solver=bl.CG(maxiter=50, tol=1e-13))

    assert _rel(torch.func.vmap(hg)(W, lam, X, y, Xv, yv), looped) <= 1e-10


@pytest.mark.parametrize("solver", [bl.CG(maxiter=40), bl.MINRES(maxiter=40), bl.GMRES(maxiter=40, restart=7),
                                    bl.FixedPoint(maxiter=100, step=0.35, tol=1e-13), bl.NormalCG(maxiter=40)],
                         ids=lambda s: type(s).__name__)
def test_solvers_stop_when_every_row_converged_under_vmap(solver):
    # under vmap the stopping test reads every row: the loop stops once all tasks have
    # converged (well before maxiter), and rows that converged early stop changing (no NaN
    # from 0/0 in a converged Krylov step)
    g = torch.Generator().manual_seed(3)
    M = torch.randn(B, D, D, generator=g, dtype=F64)
    A = M @ M.transpose(1, 2) / D + torch.eye(D, dtype=F64)
    b = torch.randn(B, D, generator=g, dtype=F64)
    calls = []

    def solve_one(A, b):
        def matvec(x):
            calls.append(1)
            return A @ x

        return bl.solve(matvec, b, solver, rmatvec=matvec)[0]

    looped = _loop(solve_one, A, b)
    loop_calls = len(calls)
    calls.clear()
    batched = torch.func.vmap(solve_one)(A, b)
    assert torch.isfinite(batched).all()
    assert _rel(batched, torch.linalg.solve(A, b)) <= 1e-10
    assert _rel(batched, looped) <= 1e-10
    per_iteration = 2 if isinstance(solver, bl.NormalCG) else 1  # matvec and rmatvec
    # at most the slowest task's count (+ the exit residual), far below maxiter
    assert len(calls) < solver.maxiter * per_iteration
    assert len(calls) <= loop_calls


@pytest.mark.parametrize("solver", [bl.CG(maxiter=D, tol=0), bl.FixedPoint(maxiter=200, step=0.3, tol=0),
                                    bl.MINRES(maxiter=D, tol=0)], ids=lambda s: type(s).__name__)
def test_tol_zero_runs_exactly_maxiter_under_vmap_without_warnings(solver, recwarn):
    # tol=0 is "exactly maxiter iterations": the solvers' own checks (CG curvature,
    # Richardson divergence) must still recognise vmap, and backward must not warn
    lam, X, y, Xv, yv = _tasks(4)
    solve = bl.implicit(inner_loss=ridge_inner, solver=solver)(lambda w0, lam, X, y: ridge_closed_form(lam, X, y))
    w0 = torch.zeros(D, dtype=F64)

    def task(lam, X, y, Xv, yv):
        return torch.func.grad(lambda lam: ridge_outer(solve(w0, lam, X, y), lam, Xv, yv))(lam)

    looped = _loop(task, lam, X, y, Xv, yv)
    assert _rel(torch.func.vmap(task)(lam, X, y, Xv, yv), looped) <= 1e-10
    assert not [w for w in recwarn if issubclass(w.category, bl.ConvergenceWarning)]


def test_benchmark_smoke(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import vmap_tasks

    out = tmp_path / "vmap_tasks.json"
    assert vmap_tasks.main(["--tasks", "3", "--repeats", "1", "--dtypes", "float64", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["family"], r["method"]) for r in rows} == {
        (f, m) for f in ("ridge", "logistic")
        for m in ("hypergrad loop", "hypergrad vmap", "implicit loop", "implicit vmap")}
    for r in rows:
        assert r["rel_err_vs_loop"] <= 1e-10 and r["rel_err_exact"] <= 1e-10, r
        assert r["median_ms"] > 0 and r["speedup_vs_loop"] > 0

"""The matrix-free solvers against dense solves, on pytrees, with their failure modes."""

import pytest
import torch

import bilevel as bl
from bilevel.linear_solve import NotContractionError, SolverError

D = torch.float64


def _system(kind: str, n: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=D) / n**0.5
    if kind == "spd":
        A = M @ M.T + 0.5 * torch.eye(n, dtype=D)
    elif kind == "indefinite":
        A = M + M.T - 0.7 * torch.eye(n, dtype=D)
    else:  # non-symmetric, eigenvalues in the right half plane
        A = M + 2.0 * torch.eye(n, dtype=D)
    b = torch.randn(n, generator=g, dtype=D)
    return A, b, torch.linalg.solve(A, b)


def _err(x, xs):
    return ((x - xs).norm() / xs.norm()).item()


@pytest.mark.parametrize(
    "kind,solver",
    [
        ("spd", bl.CG(maxiter=200)),
        ("spd", bl.MINRES(maxiter=200)),
        ("spd", bl.GMRES(maxiter=200)),
        ("spd", bl.NormalCG(maxiter=500)),
        ("spd", bl.Dense()),
        ("indefinite", bl.MINRES(maxiter=300)),
        ("indefinite", bl.Dense()),
        ("nonsym", bl.GMRES(maxiter=200, restart=10)),
        ("nonsym", bl.NormalCG(maxiter=500)),
        ("nonsym", bl.FixedPoint(maxiter=500, step=0.4)),
        ("nonsym", bl.Neumann(maxiter=500, step=0.4)),
        ("nonsym", bl.Dense()),
    ],
)
def test_solvers_match_dense_solve(kind, solver):
    A, b, xs = _system(kind)
    x, info = bl.solve(lambda v: A @ v, b, solver, rmatvec=lambda v: A.T @ v)
    assert info.converged, info
    assert _err(x, xs) < 1e-8
    # the reported residual is the true one of the returned x
    true_res = ((b - A @ x).norm() / b.norm()).item()
    assert info.residual == pytest.approx(true_res, rel=1e-3, abs=1e-14)


def test_pytree_rhs_and_warm_start():
    A, b, xs = _system("spd", n=12)
    split = lambda v: {"a": v[:5], "b": (v[5:].reshape(7, 1),)}  # noqa: E731
    join = lambda t: torch.cat([t["a"], t["b"][0].reshape(-1)])  # noqa: E731
    mv = lambda t: split(A @ join(t))  # noqa: E731
    x, info = bl.solve(mv, split(b), bl.CG())
    assert set(x) == {"a", "b"} and x["b"][0].shape == (7, 1)
    assert _err(join(x), xs) < 1e-10
    _, warm = bl.solve(mv, split(b), bl.CG(), init=split(xs + 1e-6))
    assert warm.iterations < info.iterations


def test_tol_zero_runs_exactly_maxiter_and_iterates_improve():
    A, b, xs = _system("nonsym")
    errs = []
    for k in (5, 10, 20, 40):
        x, info = bl.solve(lambda v: A @ v, b, bl.FixedPoint(maxiter=k, tol=0, step=0.4))
        assert info.iterations == k
        errs.append(_err(x, xs))
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))


def test_neumann_is_fixed_point_from_zero():
    A, b, _ = _system("nonsym")
    x1, _ = bl.solve(lambda v: A @ v, b, bl.Neumann(maxiter=17, tol=0, step=0.3))
    x2, _ = bl.solve(lambda v: A @ v, b, bl.FixedPoint(maxiter=17, tol=0, step=0.3))
    M = torch.eye(len(b), dtype=D) - 0.3 * A
    series = 0.3 * sum(torch.linalg.matrix_power(M, k) @ b for k in range(17))
    assert torch.allclose(x1, series, rtol=1e-12) and torch.allclose(x2, series, rtol=1e-12)


def test_zero_rhs_gives_zero():
    A, b, _ = _system("spd")
    for s in (bl.CG(), bl.MINRES(), bl.GMRES(), bl.FixedPoint(step=0.1), bl.NormalCG()):
        x, info = bl.solve(lambda v: A @ v, torch.zeros_like(b), s, rmatvec=lambda v: A.T @ v)
        assert torch.all(x == 0) and info.iterations == 0


def test_fixed_point_divergence_is_an_error():
    A, b, _ = _system("spd")
    with pytest.raises(NotContractionError, match="not a contraction"):
        bl.solve(lambda v: A @ v, b, bl.FixedPoint(step=50.0, maxiter=500))


def test_cg_on_indefinite_is_an_error():
    A, b, _ = _system("indefinite")
    with pytest.raises(SolverError, match="MINRES"):
        bl.solve(lambda v: A @ v, b, bl.CG(maxiter=200))


def test_bad_arguments():
    A, b, _ = _system("spd")
    with pytest.raises(TypeError, match="solver value"):
        bl.solve(lambda v: A @ v, b, bl.CG)
    with pytest.raises(TypeError, match="one of"):
        bl.solve(lambda v: A @ v, b, "cg")
    with pytest.raises(ValueError, match="rmatvec"):
        bl.solve(lambda v: A @ v, b, bl.NormalCG())
    with pytest.raises(ValueError, match="shaped like rhs"):
        bl.solve(lambda v: (A @ v)[:-1], b, bl.CG())
    with pytest.raises(ValueError, match="maxiter"):
        bl.CG(maxiter=-1)
    with pytest.raises(ValueError, match="tol"):
        bl.GMRES(tol=float("nan"))
    with pytest.raises(ValueError, match="step"):
        bl.FixedPoint(step=0.0)
    with pytest.raises(SolverError, match="NaN"):
        bl.solve(lambda v: A @ v * float("nan"), b, bl.CG(maxiter=3))


def test_cg_far_past_convergence_stays_quiet():
    # tol=0 and maxiter >> n: CG keeps iterating at rounding level without a false
    # "negative curvature" error or NaN
    A, b, xs = _system("spd", n=10)
    x, info = bl.solve(lambda v: A @ v, b, bl.CG(maxiter=200, tol=0))
    assert info.iterations == 200 and _err(x, xs) < 1e-12


@pytest.mark.parametrize("tol", [1e-10, 0.0])
def test_cg_device_path_equals_host_path(monkeypatch, tol):
    # On the CPU, CG keeps its scalars as Python floats; on an accelerator (and under vmap)
    # as 0-d tensors. Both must give the same iterates, counts and checks: force the
    # tensor path here, where no accelerator is needed.
    import bilevel.linear_solve as ls

    A, b, xs = _system("spd", n=25)
    split = lambda v: {"a": v[:10], "b": v[10:].reshape(3, 5)}  # noqa: E731
    join = lambda t: torch.cat([t["a"], t["b"].reshape(-1)])  # noqa: E731
    mv = lambda t: split(A @ join(t))  # noqa: E731
    x_host, info_host = bl.solve(mv, split(b), bl.CG(maxiter=60, tol=tol))
    monkeypatch.setattr(ls, "_host_scalars", lambda b: False)
    x_dev, info_dev = bl.solve(mv, split(b), bl.CG(maxiter=60, tol=tol))
    assert info_host.iterations == info_dev.iterations == (60 if tol == 0 else info_host.iterations)
    assert info_host.iterations < 60 or tol == 0
    assert (join(x_host) - join(x_dev)).abs().max().item() < 1e-13
    assert _err(join(x_host), xs) < 1e-9
    assert info_host.residual == pytest.approx(info_dev.residual, rel=1e-6, abs=1e-15)
    A2, b2, _ = _system("indefinite")
    with pytest.raises(SolverError, match="non-positive curvature"):
        bl.solve(lambda v: A2 @ v, b2, bl.CG(maxiter=200))


@pytest.mark.parametrize("host", [True, False])
def test_preconditioned_cg(monkeypatch, host):
    import bilevel.linear_solve as ls

    if not host:
        monkeypatch.setattr(ls, "_host_scalars", lambda b: False)
    g = torch.Generator().manual_seed(4)
    n = 40
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    scales = torch.logspace(0, 4, n, dtype=D)  # condition number 1e4, badly scaled
    A = torch.diag(scales.sqrt()) @ (Q @ torch.diag(torch.linspace(1, 3, n, dtype=D)) @ Q.T) @ torch.diag(scales.sqrt())
    b = torch.randn(n, generator=g, dtype=D)
    xs = torch.linalg.solve(A, b)
    plain = bl.solve(lambda v: A @ v, b, bl.CG(maxiter=500, tol=1e-12))
    jacobi = bl.solve(lambda v: A @ v, b, bl.CG(maxiter=500, tol=1e-12), precond=lambda r: r / A.diagonal())
    assert jacobi[1].converged and _err(jacobi[0], xs) < 1e-9
    assert jacobi[1].iterations < plain[1].iterations / 2, (jacobi[1], plain[1])
    assert info_residual_is_true(A, b, *jacobi)
    exact = bl.solve(lambda v: A @ v, b, bl.CG(maxiter=5, tol=1e-12), precond=lambda r: torch.linalg.solve(A, r))
    assert exact[1].iterations == 1 and _err(exact[0], xs) < 1e-10
    with pytest.raises(SolverError, match="not positive definite"):
        bl.solve(lambda v: A @ v, b, bl.CG(), precond=lambda r: -r)
    with pytest.raises(ValueError, match="CG"):
        bl.solve(lambda v: A @ v, b, bl.GMRES(), precond=lambda r: r)


def info_residual_is_true(A, b, x, info):
    return info.residual == pytest.approx(((b - A @ x).norm() / b.norm()).item(), rel=1e-3, abs=1e-14)


@pytest.mark.parametrize("precond", [False, True])
def test_cg_is_differentiable_through_the_solve(precond):
    # autograd through CG's iterations (x depends on θ through A(θ)): the host-float fast
    # path would drop the derivative of the step sizes, so a recorded solve stays on tensors
    A0, b, _ = _system("spd", n=8, seed=2)
    eye = torch.eye(8, dtype=D)
    theta = torch.tensor(0.7, dtype=D, requires_grad=True)
    pc = (lambda r: r / A0.diagonal()) if precond else None
    x, info = bl.solve(lambda v: (A0 + theta * eye) @ v, b, bl.CG(maxiter=100, tol=1e-14), precond=pc)
    assert info.converged
    g = torch.autograd.grad(x.sum(), theta)[0]
    th = theta.detach().requires_grad_()
    ge = torch.autograd.grad(torch.linalg.solve(A0 + th * eye, b).sum(), th)[0]
    assert abs(g.item() - ge.item()) <= 1e-8 * abs(ge.item())

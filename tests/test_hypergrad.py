"""AID hypergradients against exact answers: closed forms, dense float64 solves, FD."""

import importlib

import pytest
import torch
from problems import linear_fixed_point, logistic, newton, rel_err, ridge, ridge_dict

import bilevel as bl

PROBLEMS = {"ridge": ridge, "logistic": logistic, "linear_fp": linear_fixed_point, "ridge_dict": ridge_dict}
EXACT_SOLVERS = [bl.CG(), bl.MINRES(), bl.GMRES(), bl.NormalCG(), bl.Dense()]


def _forms(p):
    out = []
    if p.inner_loss is not None:
        out.append(("inner_loss", dict(inner_loss=p.inner_loss)))
    out.append(("fixed_point", dict(fixed_point=p.fixed_point)))
    return out


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("solver", EXACT_SOLVERS, ids=lambda s: type(s).__name__)
def test_exact_to_1e8(name, solver):
    p = PROBLEMS[name]()
    for form, kw in _forms(p):
        if name == "linear_fp" and isinstance(solver, (bl.CG, bl.MINRES)):
            continue  # non-symmetric map: refused, tested in test_errors
        hg, info = bl.hypergrad(p.outer_loss, p.params, p.hparams, solver=solver, return_info=True, **kw)
        assert rel_err(hg, p.exact) <= 1e-8, (form, info)
        assert info.converged and info.inner_residual < 1e-8


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("cls", [bl.FixedPoint, bl.Neumann])
def test_fixed_point_and_neumann_converge(name, cls):
    p = PROBLEMS[name]()
    errs = [
        rel_err(bl.hypergrad(p.outer_loss, p.params, p.hparams, fixed_point=p.fixed_point,
                             solver=cls(maxiter=k, tol=0)), p.exact)
        for k in (2, 8, 32, 128, 600)
    ]
    assert all(b < a for a, b in zip(errs, errs[1:]) if a > 1e-13), errs
    assert errs[-1] <= 1e-8, errs


def test_result_structure_follows_hparams():
    p = ridge_dict()
    hg = bl.hypergrad(p.outer_loss, p.params, p.hparams, inner_loss=p.inner_loss)
    assert isinstance(hg, tuple) and set(hg[0]) == {"scale"}
    assert hg[0]["scale"].shape == (1, 2) and hg[1].shape == (5,)
    assert not hg[1].requires_grad


def test_inner_loss_with_fixed_point_step_size():
    # Richardson on the Hessian needs step < 2/λ_max(H); FixedPoint(step=η) with the
    # inner_loss is then the same iteration as FixedPoint() on the gradient-step map.
    p = ridge()
    H = torch.func.hessian(p.inner_loss)(p.params, p.hparams)
    eta = 1.0 / torch.linalg.eigvalsh(H).max().item()
    hg = bl.hypergrad(p.outer_loss, p.params, p.hparams, inner_loss=p.inner_loss,
                      solver=bl.FixedPoint(step=eta, maxiter=2000))
    assert rel_err(hg, p.exact) < 1e-8


def test_warm_start_saves_iterations():
    p = logistic()
    hg0, info0 = bl.hypergrad(p.outer_loss, p.params, p.hparams, inner_loss=p.inner_loss, return_info=True)
    lam1 = p.hparams + 1e-4
    w1 = newton(p.inner_loss, p.params, lam1)
    _, cold = bl.hypergrad(p.outer_loss, w1, lam1, inner_loss=p.inner_loss, return_info=True,
                           solver=bl.FixedPoint(step=0.5, maxiter=5000))
    _, warm = bl.hypergrad(p.outer_loss, w1, lam1, inner_loss=p.inner_loss, return_info=True,
                           solver=bl.FixedPoint(step=0.5, maxiter=5000), init=info0.v)
    assert warm.iterations < cold.iterations


def test_nn_module_through_functional_call():
    torch.manual_seed(0)
    X, y = torch.randn(50, 5, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
    Xv, yv = torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 1, dtype=torch.float64)
    model = torch.nn.Linear(5, 1).double()
    hparams = {
        "weight": torch.full((1, 5), -1.0, dtype=torch.float64),
        "bias": torch.tensor([-2.0], dtype=torch.float64),
    }

    def inner_loss(params, lam):
        pred = torch.func.functional_call(model, params, (X,))
        return ((pred - y) ** 2).mean() + sum((lam[k].exp() * params[k] ** 2).sum() for k in params)

    def outer_loss(params, lam):
        return ((torch.func.functional_call(model, params, (Xv,)) - yv) ** 2).mean()

    # exact inner solution: the normal equations of the augmented least squares problem
    A = torch.cat([X, torch.ones(50, 1, dtype=torch.float64)], 1)

    def solve_inner(lam):
        reg = torch.diag(torch.cat([lam["weight"].reshape(-1), lam["bias"]]).exp())
        theta = torch.linalg.solve(A.T @ A / 50 + reg, A.T @ y[:, 0] / 50)
        return {"weight": theta[:5].reshape(1, 5), "bias": theta[5:]}

    params = solve_inner(hparams)
    hg = bl.hypergrad(outer_loss, params, hparams, inner_loss=inner_loss)
    flat = torch.cat([hparams["weight"].reshape(-1), hparams["bias"]])

    def F(flat):
        lam = {"weight": flat[:5].reshape(1, 5), "bias": flat[5:]}
        return outer_loss(solve_inner(lam), lam)

    exact = torch.func.grad(F)(flat)  # autograd through the dense solve = exact
    got = torch.cat([hg["weight"].reshape(-1), hg["bias"]])
    assert ((got - exact).norm() / exact.norm()) < 1e-10


def test_mlp_against_finite_differences():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True))
    Xv = torch.randn(20, 3, generator=g, dtype=torch.float64)
    yv = torch.sin(Xv.sum(1, keepdim=True))
    shapes = [(3, 4), (4,), (4, 1)]
    n = sum(torch.Size(s).numel() for s in shapes)

    def unpack(theta):
        out, i = [], 0
        for s in shapes:
            k = torch.Size(s).numel()
            out.append(theta[i:i + k].reshape(s))
            i += k
        return out

    def net(theta, X):
        W1, b1, W2 = unpack(theta)
        return torch.tanh(X @ W1 + b1) @ W2

    def inner_loss(theta, lam):
        return ((net(theta, X) - y) ** 2).mean() + 0.5 * (lam.exp() * theta**2).sum()

    def outer_loss(theta, lam):
        return ((net(theta, Xv) - yv) ** 2).mean()

    lam = torch.linspace(-4, -3, n, dtype=torch.float64)
    theta0 = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    theta = newton(inner_loss, theta0, lam)
    # a strict local minimiser (positive definite Hessian), away from the origin
    assert torch.linalg.eigvalsh(torch.func.hessian(inner_loss)(theta, lam)).min() > 1e-3
    assert theta.norm() > 0.5

    def F(lam):
        return outer_loss(newton(inner_loss, theta, lam), lam).item()

    hg = bl.hypergrad(outer_loss, theta, lam, inner_loss=inner_loss, solver=bl.CG(tol=1e-14))
    h = 1e-5
    for j in (0, 7, n - 1):
        e = torch.zeros(n, dtype=torch.float64)
        e[j] = h
        fd = (F(lam + e) - F(lam - e)) / (2 * h)
        assert hg[j].item() == pytest.approx(fd, rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("name", ["ridge", "logistic", "linear_fp"])
def test_float32(name):
    p64 = PROBLEMS[name]()
    p = PROBLEMS[name](dtype=torch.float32)
    kw = dict(fixed_point=p.fixed_point) if p.inner_loss is None else dict(inner_loss=p.inner_loss)
    solver = bl.GMRES(tol=1e-6) if p.inner_loss is None else bl.CG(tol=1e-6)
    hg = bl.hypergrad(p.outer_loss, p.params, p.hparams, solver=solver, **kw)
    assert hg.dtype == torch.float32
    assert rel_err(hg.double(), p64.exact) < 1e-4


def test_aid_forms_agree_and_match_unrolled_limit():
    p = logistic()
    a = bl.hypergrad(p.outer_loss, p.params, p.hparams, inner_loss=p.inner_loss)
    b = bl.hypergrad(p.outer_loss, p.params, p.hparams, fixed_point=p.step, solver=bl.GMRES())
    assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("name", PROBLEMS)
def test_autograd_and_torch_func_operators_agree(name, monkeypatch):
    # Outside torch.func transforms the IFT operator runs on plain autograd with a retained
    # graph (faster); under vmap/grad it runs on torch.func closures. Same numbers, every
    # form, every solver family; the torch.func side is forced here by a monkeypatch.
    core = importlib.import_module("bilevel.ift")

    p = PROBLEMS[name]()
    solvers = [bl.GMRES(), bl.NormalCG(), bl.Dense()] + ([] if name == "linear_fp" else [bl.CG()])
    runs, taken = [], []
    real = core._plain_autograd
    for plain in (True, False):
        spy = lambda *groups, plain=plain: taken.append(real(*groups) and plain) or taken[-1]  # noqa: E731
        monkeypatch.setattr(core, "_plain_autograd", spy)
        runs.append([
            torch.cat([t.reshape(-1) for t in torch.utils._pytree.tree_leaves(
                bl.hypergrad(p.outer_loss, p.params, p.hparams, solver=s, **kw))])
            for form, kw in _forms(p) for s in solvers
        ])
    half = len(taken) // 2
    assert all(taken[:half]) and not any(taken[half:])  # the first run did take the autograd path
    for a, b in zip(*runs):
        assert (a - b).abs().max().item() <= 1e-12 * max(1.0, b.abs().max().item())


def test_hparam_leaf_only_in_outer_loss():
    # An hparams leaf the inner problem does not see: its cross term is exactly zero (not an
    # error), its hypergradient the direct one. A leaf that reaches g but not ∇_w g (nor the
    # outer loss) is refused by name.
    p = ridge()
    shift = torch.tensor(0.3, dtype=torch.float64)

    def outer(w, h):
        return p.outer_loss(w, h["lam"]) + h["shift"] ** 2

    hparams = {"lam": p.hparams, "shift": shift}
    hg = bl.hypergrad(outer, p.params, hparams, inner_loss=lambda w, h: p.inner_loss(w, h["lam"]))
    assert rel_err(hg["lam"], p.exact) < 1e-8
    assert hg["shift"].item() == pytest.approx(0.6, rel=1e-14)

    def inner(w, h):
        return p.inner_loss(w, h["lam"]) + h["bias"] ** 2  # reaches g, not ∇_w g

    with pytest.raises(ValueError, match="bias"):
        bl.hypergrad(outer, p.params, {"lam": p.hparams, "shift": shift, "bias": shift.clone()}, inner_loss=inner)

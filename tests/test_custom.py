"""bilevel.implicit: a decorated inner solver gets exact implicit gradients via autograd."""

import warnings

import pytest
import torch
from problems import linear_fixed_point, logistic, newton, rel_err, ridge, ridge_dict
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import bilevel as bl

F64 = torch.float64
PROBLEMS = {"ridge": ridge, "logistic": logistic, "linear_fp": linear_fixed_point, "ridge_dict": ridge_dict}


def _inner_solver(p):
    """A real solver for each problem: Newton for ridge/logistic, Φ iterated otherwise."""
    if p.name in ("ridge", "logistic"):
        return lambda w0, lam: newton(p.inner_loss, w0, lam)

    def iterate(w0, lam):
        w = w0
        for _ in range(600):
            w = p.fixed_point(w, lam)
        return w

    return iterate


def _solvers(p, form):
    if form == "inner_loss":  # Richardson on H needs step < 2/λ_max(H)
        leaves, spec = tree_flatten(p.params)
        sizes = [t.numel() for t in leaves]

        def unflat(v):
            return tree_unflatten([c.reshape(t.shape) for c, t in zip(v.split(sizes), leaves)], spec)

        H = torch.func.hessian(lambda v: p.inner_loss(unflat(v), p.hparams))(torch.cat([t.reshape(-1) for t in leaves]))
        eta = 1.0 / torch.linalg.eigvalsh(H).max().item()
    else:
        eta = 1.0
    out = [bl.FixedPoint(step=eta, maxiter=4000), bl.Neumann(step=eta, maxiter=4000, tol=1e-12),
           bl.GMRES(), bl.NormalCG(), bl.Dense()]
    if p.name != "linear_fp":  # a symmetric system: CG/MINRES apply (linear_fp: refused below)
        out += [bl.CG(), bl.MINRES()]
    return out


def _forms(p):
    out = {"fixed_point": p.fixed_point,
           "root": lambda w, lam: tree_map(torch.sub, w, p.fixed_point(w, lam))}
    if p.inner_loss is not None:
        out["inner_loss"] = p.inner_loss
    return out


BUILT = {name: make() for name, make in PROBLEMS.items()}  # read-only: tests clone what they change
CASES = [
    (name, form, solver)
    for name, p in BUILT.items()
    for form in _forms(p)
    for solver in _solvers(p, form)
]


@pytest.mark.parametrize("name,form,solver", CASES,
                         ids=[f"{n}-{f}-{type(s).__name__}" for n, f, s in CASES])
def test_exact_for_every_problem_form_and_solver(name, form, solver):
    p = BUILT[name]
    solve = bl.implicit(solver=solver, **{form: _forms(p)[form]})(_inner_solver(p))
    hparams = tree_map(lambda t: t.clone().requires_grad_(), p.hparams)
    infos = []
    solve2 = bl.implicit(solver=solver, on_backward=infos.append, **{form: _forms(p)[form]})(_inner_solver(p))
    w = solve2(p.params0, hparams)
    p.outer_loss(w, hparams).backward()
    grads = tree_map(lambda t: t.grad, hparams)
    assert rel_err(grads, p.exact) <= 1e-8, (type(solver).__name__, infos)
    assert len(infos) == 1 and infos[0].converged and infos[0].inner_residual < 1e-8
    if isinstance(solver, (bl.GMRES, bl.Dense)):  # the same through torch.func.grad (no requires_grad)
        g = torch.func.grad(lambda lam: p.outer_loss(solve(p.params0, lam), lam))(p.hparams)
        assert rel_err(g, p.exact) <= 1e-8


def test_solver_output_is_the_solution_and_body_builds_no_graph():
    p = ridge()
    seen = []

    @bl.implicit(inner_loss=p.inner_loss)
    def solve(w0, lam):
        seen.append(torch.is_grad_enabled())
        return newton(p.inner_loss, w0, lam)  # torch.func.grad/hessian work under no_grad

    lam = p.hparams.clone().requires_grad_()
    w = solve(p.params0, lam)
    assert seen == [False]
    assert torch.allclose(w, p.params, rtol=0, atol=1e-12)
    # one autograd node between w and λ: nothing of the solver's steps is kept
    assert type(w.grad_fn).__name__ == "_ImplicitBackward"
    assert w.grad_fn.next_functions[-1][0] is not None  # λ's AccumulateGrad
    # no grad needed: a plain tensor comes back
    assert not solve(p.params0, p.hparams).requires_grad


def test_default_solver_gmres_for_a_non_symmetric_fixed_point_and_cg_refused():
    p = linear_fixed_point()
    solve = bl.implicit(fixed_point=p.fixed_point)(_inner_solver(p))
    assert rel_err(torch.func.grad(lambda lam: p.outer_loss(solve(p.params0, lam), lam))(p.hparams), p.exact) < 1e-9
    for form, fn in _forms(p).items():
        bad = bl.implicit(solver=bl.CG(), **{form: fn})(_inner_solver(p))
        lam = p.hparams.clone().requires_grad_()
        with pytest.raises(ValueError, match="not symmetric.*GMRES"):
            p.outer_loss(bad(p.params0, lam), lam).backward()


def test_nn_module_params_via_functional_call():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(50, 5, generator=g, dtype=F64), torch.randn(50, 1, generator=g, dtype=F64)
    Xv, yv = torch.randn(40, 5, generator=g, dtype=F64), torch.randn(40, 1, generator=g, dtype=F64)
    model = torch.nn.Linear(5, 1).double()
    A = torch.cat([X, torch.ones(50, 1, dtype=F64)], 1)

    def closed_form(lam):  # normal equations of the augmented ridge problem
        reg = torch.diag(torch.cat([lam["weight"].reshape(-1), lam["bias"]]).exp())
        theta = torch.linalg.solve(A.T @ A / 50 + reg, A.T @ y[:, 0] / 50)
        return {"weight": theta[:5].reshape(1, 5), "bias": theta[5:]}

    def inner_loss(params, lam, X, y):
        pred = torch.func.functional_call(model, params, (X,))
        return ((pred - y) ** 2).mean() + sum((lam[k].exp() * params[k] ** 2).sum() for k in params)

    @bl.implicit(inner_loss=inner_loss)
    def fit(params0, lam, X, y):
        return closed_form(lam)

    def outer(params):
        return ((torch.func.functional_call(model, params, (Xv,)) - yv) ** 2).mean()

    lam = {"weight": torch.full((1, 5), -1.0, dtype=F64, requires_grad=True),
           "bias": torch.tensor([-2.0], dtype=F64, requires_grad=True)}
    params0 = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    outer(fit(params0, lam, X, y)).backward()
    exact = torch.func.grad(lambda lam: outer(closed_form(lam)))({k: v.detach() for k, v in lam.items()})
    assert rel_err({k: v.grad for k, v in lam.items()}, exact) < 1e-10

    # the solver a user already has: torch.optim.LBFGS on the module's parameters, unchanged
    # but for torch.enable_grad() (the body runs under no_grad)
    @bl.implicit(inner_loss=inner_loss)
    def fit_lbfgs(params0, lam, X, y):
        with torch.enable_grad():
            params = {k: v.detach().clone().requires_grad_() for k, v in params0.items()}
            opt = torch.optim.LBFGS(list(params.values()), max_iter=500, tolerance_grad=1e-13,
                                    tolerance_change=0, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = inner_loss(params, lam, X, y)
                loss.backward()
                return loss

            opt.step(closure)
        return {k: v.detach() for k, v in params.items()}

    for v in lam.values():
        v.grad = None
    outer(fit_lbfgs(params0, lam, X, y)).backward()
    assert rel_err({k: v.grad for k, v in lam.items()}, exact) < 1e-8


# ----------------------------------------------------------------- KKT-style roots


def _box_qp(d=8, seed=5):
    """min ½wᵀQw − (Bλ + c)ᵀw  s.t. lo ≤ w ≤ hi, with an active set known in closed form."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=F64)
    Q = M @ M.T / d + 0.5 * torch.eye(d, dtype=F64)
    B = torch.randn(d, 3, generator=g, dtype=F64)
    c = 2.0 * torch.randn(d, generator=g, dtype=F64)
    lam = torch.randn(3, generator=g, dtype=F64)
    lo, hi = -0.5 * torch.ones(d, dtype=F64), 0.5 * torch.ones(d, dtype=F64)
    target = torch.randn(d, generator=g, dtype=F64)
    return Q, B, c, lam, lo, hi, target


def _solve_box_qp(Q, q, lo, hi):
    """Projected gradient, then an exact solve on the free set (finite termination)."""
    eta = 1.0 / torch.linalg.eigvalsh(Q).max()
    w = torch.zeros_like(q)
    for _ in range(3000):
        w = torch.clamp(w - eta * (Q @ w - q), lo, hi)
    free = (w > lo) & (w < hi)
    w_act = torch.where(free, 0.0, w)
    w_free = torch.linalg.solve(Q[free][:, free], (q - Q @ w_act)[free])
    return w_act.masked_scatter(free, w_free)


def test_box_qp_projected_gradient_root_with_diff_args():
    Q, B, c, lam, lo, hi, t = _box_qp()
    w_star = _solve_box_qp(Q, B @ lam + c, lo, hi)
    free = (w_star > lo + 1e-9) & (w_star < hi - 1e-9)
    assert 0 < free.sum() < len(free)  # both free and active coordinates
    # the multipliers are strictly positive on the active set (strict complementarity)
    grad_g = Q @ w_star - (B @ lam + c)
    assert (grad_g[w_star <= lo + 1e-9] > 1e-3).all() and (grad_g[w_star >= hi - 1e-9] < -1e-3).all()
    eta = 0.5 / torch.linalg.eigvalsh(Q).max()

    def pg_root(w, lam, c):  # w − proj(w − η∇g): zero exactly at the QP's solution
        return w - torch.clamp(w - eta * (Q @ w - (B @ lam + c)), lo, hi)

    def outer(w):
        return 0.5 * ((w - t) ** 2).sum()

    # exact: w_F = Q_FF⁻¹(q_F − Q_FA w_A), the active coordinates do not move
    Qff_inv = torch.linalg.inv(Q[free][:, free])
    dw_dq = torch.zeros(len(c), len(c), dtype=F64)
    dw_dq[free.nonzero()[:, 0][:, None], free.nonzero()[:, 0]] = Qff_inv
    exact_c = dw_dq.T @ (w_star - t)
    exact_lam = B.T @ exact_c
    for solver in (bl.GMRES(), bl.NormalCG(), bl.Dense(), None):
        solve = bl.implicit(root=pg_root, solver=solver, diff_args=(0,))(
            lambda w0, lam, c: _solve_box_qp(Q, B @ lam + c, lo, hi))
        lam_ = lam.clone().requires_grad_()
        c_ = c.clone().requires_grad_()
        outer(solve(torch.zeros(8, dtype=F64), lam_, c_)).backward()
        assert rel_err(lam_.grad, exact_lam) < 1e-10, solver
        assert rel_err(c_.grad, exact_c) < 1e-10, solver
    # (∂_w F)ᵀ is not symmetric here: CG is refused with a pointer to GMRES
    cg = bl.implicit(root=pg_root, solver=bl.CG(), diff_args=(0,))(
        lambda w0, lam, c: _solve_box_qp(Q, B @ lam + c, lo, hi))
    lam_ = lam.clone().requires_grad_()
    with pytest.raises(ValueError, match="root is not symmetric.*GMRES"):
        outer(cg(torch.zeros(8, dtype=F64), lam_, c)).backward()


def test_box_qp_kkt_root_with_multipliers():
    Q, B, c, lam, lo, hi, t = _box_qp(seed=8)

    def kkt(z, lam):  # stationarity and complementary slackness, F(z, λ) = 0
        w, mu, nu = z["w"], z["mu"], z["nu"]
        return {"w": Q @ w - (B @ lam + c) - mu + nu, "mu": mu * (w - lo), "nu": nu * (hi - w)}

    @bl.implicit(root=kkt)
    def solve(z0, lam):
        w = _solve_box_qp(Q, B @ lam + c, lo, hi)
        grad_g = Q @ w - (B @ lam + c)
        return {"w": w, "mu": torch.where(w <= lo, grad_g, 0.0), "nu": torch.where(w >= hi, -grad_g, 0.0)}

    z0 = {"w": torch.zeros(8, dtype=F64), "mu": torch.zeros(8, dtype=F64), "nu": torch.zeros(8, dtype=F64)}
    z = solve(z0, lam)
    assert all(v.abs().max() < 1e-12 for v in kkt(z, lam).values())  # a KKT point
    assert ((z["mu"] > 1e-3) | (z["nu"] > 1e-3)).sum() >= 2  # with active constraints
    free = (z["mu"] == 0) & (z["nu"] == 0)
    assert 0 < free.sum() < len(free)
    exact = B[free].T @ torch.linalg.solve(Q[free][:, free], (z["w"] - t)[free])
    lam_ = lam.clone().requires_grad_()
    (0.5 * ((solve(z0, lam_)["w"] - t) ** 2).sum()).backward()
    assert rel_err(lam_.grad, exact) < 1e-10


def test_simplex_projection_root():
    # w(λ) = proj_Δ(λ) = argmin ½‖w − λ‖² on the simplex; dw/dλ = I_S − 1_S1_Sᵀ/|S| on the support S
    lam = torch.tensor([0.9, 0.5, -0.3, 0.35, -1.0], dtype=F64)

    def proj_simplex(v):
        u, _ = torch.sort(v, descending=True)
        css = torch.cumsum(u, 0) - 1
        k = torch.arange(1, len(v) + 1, dtype=v.dtype)
        rho = (u - css / k > 0).nonzero().max()
        return torch.clamp(v - css[rho] / (rho + 1), min=0)

    def root(w, lam):  # fixed-point map of projected gradient with step 1/2 on ½‖w − λ‖²
        return w - proj_simplex(w - 0.5 * (w - lam))

    solve = bl.implicit(root=root)(lambda w0, lam: proj_simplex(lam))
    t = torch.arange(5, dtype=F64)
    lam_ = lam.clone().requires_grad_()
    w = solve(torch.zeros(5, dtype=F64), lam_)
    (w * t).sum().backward()
    S = (w > 0).to(F64)
    assert 1 < S.sum() < 5
    jac = torch.diag(S) - torch.outer(S, S) / S.sum()
    assert rel_err(lam_.grad, jac.T @ t) < 1e-12


# ----------------------------------------------------------------- second order


def test_hypergradient_of_hypergradient_with_dense():
    # ridge: F(λ) in closed form; the Hessian of F through the implicit op matches it
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(30, 4, generator=g, dtype=F64), torch.randn(30, generator=g, dtype=F64)
    Xv, yv = torch.randn(30, 4, generator=g, dtype=F64), torch.randn(30, generator=g, dtype=F64)

    def closed(lam):
        return torch.linalg.solve(X.T @ X / 30 + torch.diag(lam.exp()), X.T @ y / 30)

    def inner_loss(w, lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer(w):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    solve = bl.implicit(inner_loss=inner_loss, solver=bl.Dense())(lambda w0, lam: closed(lam))
    lam = torch.tensor([-1.0, -0.5, 0.0, -2.0], dtype=F64)
    exact = torch.func.hessian(lambda lam: outer(closed(lam)))(lam)
    got = torch.func.jacrev(torch.func.grad(lambda lam: outer(solve(torch.zeros(4, dtype=F64), lam))))(lam)
    assert rel_err(got, exact) < 1e-10
    lam_ = lam.clone().requires_grad_()
    (gr,) = torch.autograd.grad(outer(solve(torch.zeros(4, dtype=F64), lam_)), lam_, create_graph=True)
    rows = torch.stack([torch.autograd.grad(gr[i], lam_, retain_graph=True)[0] for i in range(4)])
    assert rel_err(rows, exact) < 1e-10


# ----------------------------------------------------------------- bad input


def test_output_structure_mismatch():
    p = ridge()
    lam = p.hparams.clone().requires_grad_()
    for bad in (lambda w0, lam: w0[:-1], lambda w0, lam: (w0,), lambda w0, lam: w0.float()):
        with pytest.raises(ValueError, match="structure, shapes and dtypes of params0"):
            bl.implicit(inner_loss=p.inner_loss)(bad)(p.params0, lam)


def test_nan_input_and_nan_output():
    p = ridge()
    solve = bl.implicit(inner_loss=p.inner_loss)(_inner_solver(p))
    with pytest.raises(ValueError, match="hparams contains NaN"):
        solve(p.params0, p.hparams * float("nan"))
    nan_solver = bl.implicit(inner_loss=p.inner_loss)(lambda w0, lam: w0 * float("nan"))
    with pytest.raises(bl.SolverError, match="NaN or Inf in the inner solver's output"):
        nan_solver(p.params0, p.hparams)


def test_not_converged_inner_solver_warns_with_residual():
    p = logistic()

    @bl.implicit(inner_loss=p.inner_loss, inner_tol=1e-8)
    def three_steps(w0, lam):
        w = w0
        for _ in range(3):
            w = p.step(w, lam)
        return w

    lam = p.hparams.clone().requires_grad_()
    with pytest.warns(bl.ConvergenceWarning, match=r"inner_loss‖ = \d\.\d\de-\d\d > inner_tol"):
        p.outer_loss(three_steps(p.params0, lam), lam).backward()
    # converged: no warning
    good = bl.implicit(inner_loss=p.inner_loss, inner_tol=1e-8)(_inner_solver(p))
    lam = p.hparams.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.outer_loss(good(p.params0, lam), lam).backward()


def test_not_converged_linear_solve_warns():
    p = logistic()
    solve = bl.implicit(inner_loss=p.inner_loss, solver=bl.CG(maxiter=1))(_inner_solver(p))
    lam = p.hparams.clone().requires_grad_()
    with pytest.warns(bl.ConvergenceWarning, match="CG stopped after 1 iterations with relative residual"):
        p.outer_loss(solve(p.params0, lam), lam).backward()


def test_misuse_is_refused_eagerly():
    p = ridge()
    with pytest.raises(ValueError, match="exactly one of inner_loss"):
        bl.implicit()
    with pytest.raises(ValueError, match="exactly one of inner_loss"):
        bl.implicit(inner_loss=p.inner_loss, root=p.step)
    with pytest.raises(TypeError, match="not the class CG"):
        bl.implicit(inner_loss=p.inner_loss, solver=bl.CG)
    with pytest.raises(TypeError, match="diff_args should be a tuple"):
        bl.implicit(inner_loss=p.inner_loss, diff_args=0)
    with pytest.raises(TypeError, match="decorates a function"):
        bl.implicit(inner_loss=p.inner_loss)(3)
    solve = bl.implicit(inner_loss=lambda w, lam, X: p.inner_loss(w, lam), diff_args=(1,))(
        lambda w0, lam, X: p.params)
    with pytest.raises(ValueError, match="names an argument the solver was not given"):
        solve(p.params0, p.hparams, torch.ones(2, dtype=F64))
    loose = bl.implicit(inner_loss=lambda w, lam, X: p.inner_loss(w, lam))(lambda w0, lam, X: p.params)
    with pytest.raises(ValueError, match=r"args\[0\] requires grad but is not in diff_args"):
        loose(p.params0, p.hparams, torch.ones(2, dtype=F64, requires_grad=True))
    with pytest.raises(TypeError, match="share one dtype"):
        loose(p.params0.float(), p.hparams, None)


def test_non_scalar_inner_loss_raises_at_backward():
    p = ridge()
    solve = bl.implicit(inner_loss=lambda w, lam: w**2)(_inner_solver(p))
    lam = p.hparams.clone().requires_grad_()
    with pytest.raises(ValueError, match="inner_loss should return a scalar"):
        p.outer_loss(solve(p.params0, lam), lam).backward()

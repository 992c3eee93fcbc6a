"""bilevel.implicit and torch.func, as JAXopt's implicit diff: forward mode (jvp, jacfwd,
hessian), has_aux, keyword arguments, and the warning policy under vmap (float64)."""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from problems import linear_fixed_point, rel_err

import bilevel as bl

F64 = torch.float64
N, D = 30, 4


def _data(seed=0, n=N, d=D):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    Xv, yv = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    lam = 0.5 * torch.randn(d, generator=g, dtype=F64) - 1.0
    return lam, X, y, Xv, yv


LAM, X, Y, XV, YV = _data()
W0 = torch.zeros(D, dtype=F64)


def closed(lam, X=X, y=Y):
    """w*(λ) = (XᵀX + diag(e^λ))⁻¹ Xᵀy."""
    return torch.linalg.solve(X.T @ X + torch.diag(lam.exp()), X.T @ y)


def inner(w, lam, X=X, y=Y):
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam.exp() * w**2).sum()


def outer(w, Xv=XV, yv=YV):
    return 0.5 * ((Xv @ w - yv) ** 2).mean()


def _step(lam, X=X):  # a contraction step size for Φ(w) = w − η ∇_w g
    return 1.0 / torch.linalg.eigvalsh(X.T @ X + torch.diag(lam.exp())).max().item()


ETA = _step(LAM)


def phi(w, lam):
    return w - ETA * (X.T @ (X @ w - Y) + lam.exp() * w)


FORMS = {"inner_loss": inner, "fixed_point": phi, "root": lambda w, lam: X.T @ (X @ w - Y) + lam.exp() * w}
TIGHT = {"CG": bl.CG(tol=1e-13), "MINRES": bl.MINRES(tol=1e-13), "GMRES": bl.GMRES(tol=1e-13),
         "NormalCG": bl.NormalCG(tol=1e-13, maxiter=500), "Dense": bl.Dense(),
         "FixedPoint": bl.FixedPoint(step=1.0, maxiter=20000, tol=1e-13)}
CASES = [("inner_loss", s) for s in ("CG", "MINRES", "GMRES", "NormalCG", "Dense")] + [
    (f, s) for f in ("fixed_point", "root") for s in ("GMRES", "NormalCG", "Dense")] + [("fixed_point", "FixedPoint")]


def _solve(form, solver, **kw):
    return bl.implicit(solver=TIGHT[solver], **{form: FORMS[form]}, **kw)(lambda w0, lam: closed(lam))


# ----------------------------------------------------------------- forward mode


@pytest.mark.parametrize("form,solver", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_jvp_and_jacfwd_equal_the_closed_form(form, solver):
    solve = _solve(form, solver)
    tangent = torch.linspace(-1.0, 2.0, D, dtype=F64)
    w, wdot = torch.func.jvp(lambda lam: solve(W0, lam), (LAM,), (tangent,))
    w_ref, wdot_ref = torch.func.jvp(closed, (LAM,), (tangent,))
    assert rel_err(w, w_ref) < 1e-12
    assert rel_err(wdot, wdot_ref) < 1e-8
    exact = torch.func.jacrev(closed)(LAM)
    fwd = torch.func.jacfwd(lambda lam: solve(W0, lam))(LAM)
    rev = torch.func.jacrev(lambda lam: solve(W0, lam))(LAM)
    assert rel_err(fwd, exact) < 1e-8 and rel_err(rev, exact) < 1e-8 and rel_err(fwd, rev) < 1e-8


@pytest.mark.parametrize("form,solver", [("inner_loss", "CG"), ("inner_loss", "Dense"), ("fixed_point", "GMRES"),
                                         ("root", "NormalCG")])
def test_hessian_of_outer_loss_equals_the_closed_form(form, solver):
    solve = _solve(form, solver)
    exact = torch.func.hessian(lambda lam: outer(closed(lam)))(LAM)
    got = torch.func.hessian(lambda lam: outer(solve(W0, lam)))(LAM)
    assert rel_err(got, exact) < 1e-6
    # forward-over-reverse by hand, and reverse-over-reverse: the same matrix
    assert rel_err(torch.func.jacfwd(torch.func.grad(lambda lam: outer(solve(W0, lam))))(LAM), exact) < 1e-6
    assert rel_err(torch.func.jacrev(torch.func.grad(lambda lam: outer(solve(W0, lam))))(LAM), exact) < 1e-6


@pytest.mark.parametrize("form", ["fixed_point", "root"])
@pytest.mark.parametrize("solver", ["GMRES", "NormalCG", "Dense", "FixedPoint"])
def test_forward_mode_on_a_non_symmetric_system_uses_the_transpose(form, solver):
    # Φ = A w + B λ + c with A non-symmetric: dw/dλ = (I − A)⁻¹ B; solving with (I − A)ᵀ
    # instead would be wrong by O(1)
    p = linear_fixed_point()
    A = torch.func.jacrev(lambda w: p.fixed_point(w, p.hparams))(p.params)
    B = torch.func.jacrev(lambda lam: p.fixed_point(p.params, lam))(p.hparams)
    exact = torch.linalg.solve(torch.eye(len(p.params), dtype=F64) - A, B)
    cond = p.fixed_point if form == "fixed_point" else (lambda w, lam: w - p.fixed_point(w, lam))
    solver_ = TIGHT[solver] if solver != "FixedPoint" else bl.FixedPoint(maxiter=500, tol=1e-14)

    @bl.implicit(solver=solver_, **{form: cond})
    def solve(w0, lam):
        c = p.fixed_point(torch.zeros_like(w0), torch.zeros_like(lam))
        return torch.linalg.solve(torch.eye(len(w0), dtype=F64) - A, B @ lam + c)

    assert rel_err(torch.func.jacfwd(lambda lam: solve(p.params0, lam))(p.hparams), exact) < 1e-9
    assert rel_err(torch.func.jacrev(lambda lam: solve(p.params0, lam))(p.hparams), exact) < 1e-9


def test_jvp_through_marked_args_and_params0_tangent_ignored():
    @bl.implicit(inner_loss=inner, diff_args=(0, 1), solver=bl.CG(tol=1e-13))
    def solve(w0, lam, X, y):
        return closed(lam, X, y)

    dlam, dX, dy, dw0 = (torch.randn(t.shape, dtype=F64, generator=torch.Generator().manual_seed(i))
                         for i, t in enumerate((LAM, X, Y, W0)))
    _, got = torch.func.jvp(lambda w0, lam, X, y: solve(w0, lam, X, y), (W0, LAM, X, Y), (dw0, dlam, dX, dy))
    _, ref = torch.func.jvp(closed, (LAM, X, Y), (dlam, dX, dy))
    assert rel_err(got, ref) < 1e-8
    # only params0 moves: the solution does not depend on the start
    _, zero = torch.func.jvp(lambda w0: solve(w0, LAM, X, Y), (W0,), (dw0,))
    assert torch.equal(zero, torch.zeros_like(zero))
    # jacfwd with respect to a marked pytree argument
    J = torch.func.jacfwd(lambda y: solve(W0, LAM, X, y))(Y)
    assert rel_err(J, torch.func.jacrev(lambda y: closed(LAM, X, y))(Y)) < 1e-8


def test_tangent_of_an_unmarked_arg_is_refused():
    @bl.implicit(inner_loss=inner)
    def solve(w0, lam, X, y):
        return closed(lam, X, y)

    with pytest.raises(ValueError, match=r"args\[0\] carries a forward-mode tangent but is not in diff_args.*"
                                         r"silently be zero.*diff_args=\(0,\)"):
        torch.func.jvp(lambda X: solve(W0, LAM, X, Y), (X,), (torch.ones_like(X),))
    with pytest.raises(ValueError, match=r"kwargs\['y'\] carries a forward-mode tangent.*silently be zero"):
        torch.func.jacfwd(lambda y: solve(W0, LAM, X, y=y))(Y)


def test_vmap_and_forward_mode_compose():
    lams = torch.stack([LAM, LAM + 0.3, LAM - 0.7])
    solve = _solve("inner_loss", "CG")
    exact_J = torch.stack([torch.func.jacrev(closed)(lam) for lam in lams])
    exact_H = torch.stack([torch.func.hessian(lambda lam: outer(closed(lam)))(lam) for lam in lams])
    f = lambda lam: solve(W0, lam)  # noqa: E731
    assert rel_err(torch.func.vmap(torch.func.jacfwd(f))(lams), exact_J) < 1e-8
    blocks = torch.func.jacfwd(torch.func.vmap(f))(lams)  # (task, D, task, D), block diagonal
    assert rel_err(torch.stack([blocks[i, :, i] for i in range(3)]), exact_J) < 1e-8
    assert blocks[0, :, 1].abs().max() == 0  # task 0 does not depend on task 1's λ
    tangents = torch.randn(3, D, dtype=F64, generator=torch.Generator().manual_seed(5))
    _, wdot = torch.func.vmap(lambda lam, t: torch.func.jvp(f, (lam,), (t,)))(lams, tangents)
    assert rel_err(wdot, torch.einsum("bij,bj->bi", exact_J, tangents)) < 1e-8
    H = torch.func.vmap(torch.func.hessian(lambda lam: outer(solve(W0, lam))))(lams)
    assert rel_err(H, exact_H) < 1e-6
    # a batch of tasks, each with its own data, differentiated forward
    tasks = [_data(s) for s in range(3)]
    lam_b, X_b, y_b = (torch.stack([t[i] for t in tasks]) for i in range(3))

    @bl.implicit(inner_loss=inner, solver=bl.CG(tol=1e-13))
    def fit(w0, lam, X, y):
        return closed(lam, X, y)

    got = torch.func.vmap(torch.func.jacfwd(lambda lam, X, y: fit(W0, lam, X, y)))(lam_b, X_b, y_b)
    ref = torch.stack([torch.func.jacrev(closed)(*task) for task in zip(lam_b, X_b, y_b)])
    assert rel_err(got, ref) < 1e-8


def test_third_order_and_forward_over_forward():
    solve = _solve("inner_loss", "CG")
    f = lambda lam: outer(solve(W0, lam))  # noqa: E731
    # reference by reverse mode only: torch 2.13's reverse-over-forward through
    # torch.linalg.solve itself is off (jacrev(jacfwd(solve)) ≠ jacrev(jacrev(solve)))
    exact = torch.func.jacrev(torch.func.jacrev(torch.func.grad(lambda lam: outer(closed(lam)))))(LAM)
    assert rel_err(torch.func.jacfwd(torch.func.jacrev(torch.func.grad(f)))(LAM), exact) < 1e-6
    assert rel_err(torch.func.jacrev(torch.func.jacrev(torch.func.grad(f)))(LAM), exact) < 1e-6
    hess = torch.func.hessian(lambda lam: outer(closed(lam)))(LAM)
    for solver in ("CG", "Dense"):
        f = lambda lam, s=solver: outer(_solve("inner_loss", s)(W0, lam))  # noqa: E731
        assert rel_err(torch.func.jacrev(torch.func.jacfwd(f))(LAM), hess) < 1e-8
    # forward over forward: torch would drop the outer tangent inside the jvp rule (a zero
    # second derivative), so it is refused
    with pytest.raises(NotImplementedError, match=r"forward mode over forward mode.*torch.func.hessian"):
        torch.func.jacfwd(torch.func.jacfwd(f))(LAM)


def test_forward_ad_dual_tensors_are_refused_with_a_pointer_to_torch_func():
    solve = _solve("inner_loss", "CG")
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="torch.func.jvp"):
        solve(W0, fwAD.make_dual(LAM, torch.ones_like(LAM)))


def test_unconverged_forward_solve_warns():
    solve = bl.implicit(inner_loss=inner, solver=bl.CG(maxiter=1))(lambda w0, lam: closed(lam))
    with pytest.warns(bl.ConvergenceWarning, match="implicit jvp: CG stopped after 1 iterations"):
        torch.func.jvp(lambda lam: solve(W0, lam), (LAM,), (torch.ones_like(LAM),))


# ----------------------------------------------------------------- has_aux


def test_has_aux_passes_aux_through_undifferentiated():
    @bl.implicit(inner_loss=inner, has_aux=True, solver=bl.CG(tol=1e-13))
    def solve(w0, lam):
        w = closed(lam)
        return w, {"iterations": 7, "loss": inner(w, lam), "count": torch.tensor(7), "name": "direct"}

    lam = LAM.clone().requires_grad_()
    w, aux = solve(W0, lam)
    assert set(aux) == {"iterations", "loss", "count", "name"}
    assert aux["iterations"] == 7 and aux["name"] == "direct" and aux["count"].dtype == torch.int64
    assert torch.allclose(aux["loss"], inner(closed(LAM), LAM)) and not aux["loss"].requires_grad
    assert w.requires_grad
    outer(w).backward()
    assert rel_err(lam.grad, torch.func.grad(lambda lam: outer(closed(lam)))(LAM)) < 1e-8
    # torch.func: grad/jacfwd with the aux carried along
    g, aux2 = torch.func.grad(lambda lam: (outer(solve(W0, lam)[0]), solve(W0, lam)[1]["loss"]), has_aux=True)(LAM)
    assert rel_err(g, lam.grad) < 1e-10 and torch.allclose(aux2, aux["loss"])
    # (torch.func's own has_aux= accepts tensors only: hand it the tensor leaves)
    J, aux3 = torch.func.jacfwd(lambda lam: (solve(W0, lam)[0], solve(W0, lam)[1]["count"]), has_aux=True)(LAM)
    assert rel_err(J, torch.func.jacrev(closed)(LAM)) < 1e-8 and aux3.item() == 7
    _, wdot, aux4 = torch.func.jvp(lambda lam: (solve(W0, lam)[0], solve(W0, lam)[1]["loss"]), (LAM,),
                                   (torch.ones_like(LAM),), has_aux=True)
    assert torch.allclose(aux4, aux["loss"])
    # aux is any pytree; None is fine
    none = bl.implicit(inner_loss=inner, has_aux=True)(lambda w0, lam: (closed(lam), None))
    assert none(W0, LAM)[1] is None


def test_has_aux_under_vmap():
    lams = torch.stack([LAM, LAM + 0.3, LAM - 0.7])
    seen = []

    @bl.implicit(inner_loss=inner, has_aux=True, solver=bl.CG(tol=1e-13))
    def solve(w0, lam):
        w = closed(lam)
        return w, (inner(w, lam), torch.tensor(3), "info")

    def task(lam):
        w, (loss, steps, name) = solve(W0, lam)
        seen.append(name)  # a non-tensor aux leaf: usable inside, not returnable from vmap
        return w, loss, steps

    w, loss, steps = torch.func.vmap(task)(lams)
    assert seen == ["info"]
    assert rel_err(loss, torch.stack([inner(closed(lam), lam) for lam in lams])) < 1e-12
    assert steps.tolist() == [3, 3, 3]
    assert rel_err(w, torch.stack([closed(lam) for lam in lams])) < 1e-12
    # gradients through the batch, aux along for the ride
    g = torch.func.vmap(torch.func.grad(lambda lam: outer(solve(W0, lam)[0])))(lams)
    assert rel_err(g, torch.stack([torch.func.grad(lambda lam: outer(closed(lam)))(lam) for lam in lams])) < 1e-8


def test_has_aux_misuse():
    with pytest.raises(ValueError, match=r"has_aux=True.*pair \(params_star, aux\)"):
        bl.implicit(inner_loss=inner, has_aux=True)(lambda w0, lam: closed(lam))(W0, LAM)
    with pytest.raises(ValueError, match="pass has_aux=True"):
        bl.implicit(inner_loss=inner)(lambda w0, lam: (closed(lam), 3))(W0, LAM)
    with pytest.raises(TypeError, match="has_aux should be True or False"):
        bl.implicit(inner_loss=inner, has_aux=1)


# ----------------------------------------------------------------- keyword arguments


def test_kwargs_reach_solver_and_condition_and_vmap_batches_them():
    seen = {}

    def inner_kw(w, lam, X, *, y, scale=1.0):
        seen["condition"] = scale
        return scale * inner(w, lam, X, y)

    @bl.implicit(inner_loss=inner_kw, solver=bl.CG(tol=1e-13))
    def solve(w0, lam, X, *, y, scale=1.0):
        seen["solver"] = scale
        return closed(lam, X, y)

    lam = LAM.clone().requires_grad_()
    outer(solve(W0, lam, X, y=Y, scale=1.0)).backward()
    assert seen == {"solver": 1.0, "condition": 1.0}
    assert rel_err(lam.grad, torch.func.grad(lambda lam: outer(closed(lam)))(LAM)) < 1e-8
    # tensor kwargs are inputs of the operation: vmap sees them
    tasks = [_data(s) for s in range(3)]
    lam_b, X_b, y_b = (torch.stack([t[i] for t in tasks]) for i in range(3))
    got = torch.func.vmap(torch.func.grad(lambda lam, X, y: outer(solve(W0, lam, X, y=y))))(lam_b, X_b, y_b)
    ref = torch.stack([torch.func.grad(lambda lam, X, y: outer(closed(lam, X, y)))(*task)
                       for task in zip(lam_b, X_b, y_b)])
    assert rel_err(got, ref) < 1e-8
    w = torch.func.vmap(lambda lam, X, y: solve(W0, lam, X, y=y))(lam_b, X_b, y_b)
    assert rel_err(w, torch.stack([closed(*t[:3]) for t in tasks])) < 1e-12
    # forward mode with a kwarg: its tangent-free value travels along
    J = torch.func.jacfwd(lambda lam: solve(W0, lam, X, y=Y))(LAM)
    assert rel_err(J, torch.func.jacrev(closed)(LAM)) < 1e-8


def test_kwarg_that_requires_grad_is_refused():
    @bl.implicit(inner_loss=lambda w, lam, *, y: inner(w, lam, X, y))
    def solve(w0, lam, *, y):
        return closed(lam, X, y)

    with pytest.raises(ValueError, match=r"kwargs\['y'\] requires grad but keyword arguments are not "
                                         r"differentiated, so its gradient would silently be zero\. "
                                         r"Pass it as a positional arg in diff_args, or detached"):
        solve(W0, LAM, y=Y.clone().requires_grad_())
    with pytest.raises(ValueError, match=r"args\[0\] requires grad but is not in diff_args, so its gradient "
                                         r"would silently be zero\. Pass it as a positional arg in diff_args"):
        bl.implicit(inner_loss=inner)(lambda w0, lam, X: closed(lam, X))(W0, LAM, X.clone().requires_grad_())
    with torch.no_grad():  # nothing is differentiated: fine
        solve(W0, LAM, y=Y.clone().requires_grad_())
    solve(W0, LAM, y=Y.clone().requires_grad_().detach())


# ----------------------------------------------------------------- warnings under vmap


def _ill_batch():
    """3 ridge tasks: two with H = c·I (CG: one step), one with eigenvalues over 6 decades."""
    d = 8
    Xs = torch.zeros(3, 10, d, dtype=F64)
    ys = torch.zeros(3, 10, dtype=F64)
    lams = torch.zeros(3, d, dtype=F64)
    Xs[2] = torch.randn(10, d, dtype=F64, generator=torch.Generator().manual_seed(0)) * 1e-3
    ys[2] = torch.randn(10, dtype=F64, generator=torch.Generator().manual_seed(1))
    lams[2] = torch.linspace(-7.0, 7.0, d, dtype=F64)
    return lams, Xs, ys, torch.ones(3, d, dtype=F64)


def test_unconverged_backward_under_vmap_warns_when_any_task_misses_tol():
    lams, Xs, ys, targets = _ill_batch()
    infos = []

    @bl.implicit(inner_loss=lambda w, lam, X, y: inner(w, lam, X, y), solver=bl.CG(maxiter=3), on_backward=infos.append)
    def solve(w0, lam, X, y):
        return closed(lam, X, y)

    def task(lam, X, y, t):
        return torch.func.grad(lambda lam: ((solve(torch.zeros_like(t), lam, X, y) - t) ** 2).sum())(lam)

    with warnings.catch_warnings():  # one task at a time: only the ill-conditioned one warns
        warnings.simplefilter("error", bl.ConvergenceWarning)
        for i in range(2):
            task(lams[i], Xs[i], ys[i], targets[i])
            assert infos[-1].converged
    with pytest.warns(bl.ConvergenceWarning):
        task(lams[2], Xs[2], ys[2], targets[2])
    bad = infos[-1]
    assert not bad.converged and bad.iterations == 3
    with pytest.warns(bl.ConvergenceWarning, match="implicit backward: CG stopped after 3 iterations") as rec:
        torch.func.vmap(task)(lams, Xs, ys, targets)
    assert len(rec) == 1
    # the message gives the worst row's residual: the ill-conditioned task's
    assert f"relative residual {bad.residual:.2e} > tol" in str(rec[0].message)
    # well-conditioned rows alone under vmap: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.ConvergenceWarning)
        torch.func.vmap(task)(lams[:2], Xs[:2], ys[:2], targets[:2])


def test_inner_tol_warns_under_vmap_for_one_bad_task():
    lams = torch.stack([LAM, LAM + 0.3, LAM - 0.7])
    offsets = torch.tensor([0.0, 0.0, 1e-3], dtype=F64)

    @bl.implicit(inner_loss=lambda w, lam, off: inner(w, lam), inner_tol=1e-8)
    def solve(w0, lam, off):
        return closed(lam) + off  # task 2: not the minimiser

    def task(lam, off):
        return torch.func.grad(lambda lam: outer(solve(W0, lam, off)))(lam)

    with pytest.warns(bl.ConvergenceWarning, match=r"inner_loss‖ = \d\.\d\de-\d\d > inner_tol"):
        torch.func.vmap(task)(lams, offsets)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.ConvergenceWarning)
        torch.func.vmap(task)(lams[:2], offsets[:2])

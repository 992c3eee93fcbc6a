"""compiled_hypergrad: the AID-CG step as one torch.compile graph, against hypergrad and exact answers.

Most tests trace with backend="aot_eager" (the whole graph is captured with fullgraph=True,
which raises on any graph break, but no code is generated: fast, and no C++ compiler
needed); one runs inductor where a C++ compiler exists."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from error_instances import linear_contraction, logistic, ridge

import bilevel

BACKEND = "aot_eager"


@pytest.mark.parametrize("make", [ridge, logistic])
def test_matches_hypergrad_and_the_exact_answer(make):
    inst = make(2, 100.0)
    d = inst.w_star.numel()
    fn = bilevel.compiled_hypergrad(inst.outer_loss, inner_loss=inst.inner_loss, maxiter=d, backend=BACKEND)
    hg, info = fn(inst.w_star, inst.hparams)
    ref = bilevel.hypergrad(inst.outer_loss, inst.w_star, inst.hparams, inner_loss=inst.inner_loss,
                            solver=bilevel.CG(maxiter=d, tol=0.0))
    assert (hg - ref).norm() <= 1e-8 * ref.norm()  # past convergence the two CGs' rounding differs
    assert (hg - inst.exact).norm() <= 1e-6 * inst.exact.norm()
    assert info.iterations == d and info.converged and info.solver == "CG (compiled)"
    # same graph, new values: no recompilation needed, still right
    w2 = inst.w_star + 1e-3
    hg2, _ = fn(w2, inst.hparams)
    ref2 = bilevel.hypergrad(inst.outer_loss, w2, inst.hparams, inner_loss=inst.inner_loss,
                             solver=bilevel.CG(maxiter=d, tol=0.0), inner_tol=math.inf)
    assert (hg2 - ref2).norm() <= 1e-8 * ref2.norm()


def test_pytrees_and_damping():
    inst = ridge(4, 10.0)

    def split(p):
        return torch.cat([p["a"], p["b"]])

    def inner(p, h):
        return inst.inner_loss(split(p), h["lam"])

    def outer(p, h):
        return inst.outer_loss(split(p), h["lam"])

    P = {"a": inst.w_star[:4].clone(), "b": inst.w_star[4:].clone()}
    H = {"lam": inst.hparams.clone()}
    fn = bilevel.compiled_hypergrad(outer, inner_loss=inner, maxiter=10, damping=0.5, backend=BACKEND)
    hg, info = fn(P, H)
    ref = bilevel.hypergrad(outer, P, H, inner_loss=inner, solver=bilevel.CG(maxiter=10, tol=0.0), damping=0.5)
    assert set(hg) == {"lam"} and (hg["lam"] - ref["lam"]).norm() <= 1e-10 * ref["lam"].norm()
    assert info.damping == 0.5 and set(info.v) == {"a", "b"}


def test_unconverged_warns_and_negative_curvature_raises():
    inst = ridge(1, 1e3)
    fn = bilevel.compiled_hypergrad(inst.outer_loss, inner_loss=inst.inner_loss, maxiter=2, backend=BACKEND)
    with pytest.warns(bilevel.ConvergenceWarning, match="compiled_hypergrad: CG \\(compiled\\) stopped after 2"):
        _, info = fn(inst.w_star, inst.hparams)
    assert not info.converged and info.residual > 1e-6

    def saddle(w, lam):  # indefinite: w0² − w1²
        return w[0] ** 2 - w[1] ** 2 + (lam * w).sum()

    def outer(w, lam):  # ∇_w f(0) = (−2, −6): ⟨b, H b⟩ = 8 − 72 < 0
        return (w[0] - 1) ** 2 + 3 * (w[1] - 1) ** 2

    fn = bilevel.compiled_hypergrad(outer, inner_loss=saddle, maxiter=2, backend=BACKEND)
    w = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(bilevel.SolverError, match="non-positive curvature.*damping"):
        fn(w, torch.ones(2, dtype=torch.float64))


def test_inner_residual_nan_and_unreached_hparams():
    inst = ridge(3, 10.0)
    fn = bilevel.compiled_hypergrad(inst.outer_loss, inner_loss=inst.inner_loss, maxiter=10, backend=BACKEND)
    with pytest.warns(bilevel.ConvergenceWarning, match="far from the inner solution"):
        fn(inst.w0, inst.hparams)  # w0 = 0: measured against ‖H u‖, as hypergrad does
    with pytest.raises(ValueError, match="hparams"):
        fn(inst.w_star, torch.full_like(inst.hparams, math.nan))

    def inner(w, h):
        return inst.inner_loss(w, h["lam"])

    fn = bilevel.compiled_hypergrad(lambda w, h: inst.outer_loss(w, h["lam"]), inner_loss=inner, maxiter=10,
                                    backend=BACKEND)
    with pytest.raises(ValueError, match="reaches neither"):
        fn(inst.w_star, {"lam": inst.hparams, "unused": torch.ones(2, dtype=torch.float64)})


def test_data_updated_in_place_is_read_by_the_graph():
    """A minibatch the losses close over, updated in place between calls: the compiled graph
    reads the new values (no stale constants baked in)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, dtype=torch.float64, generator=gen)
    y = torch.randn(40, dtype=torch.float64, generator=gen)

    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer(w, lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.1 * w.sum()

    def w_star(lam):
        return torch.linalg.solve(X.T @ X / 40 + torch.diag(lam.exp()), X.T @ y / 40)

    fn = bilevel.compiled_hypergrad(outer, inner_loss=inner, maxiter=5, backend=BACKEND)
    lam = torch.zeros(5, dtype=torch.float64)
    first, _ = fn(w_star(lam), lam)
    X.copy_(torch.randn(40, 5, dtype=torch.float64, generator=gen))
    second, _ = fn(w_star(lam), lam)
    ref = bilevel.hypergrad(outer, w_star(lam), lam, inner_loss=inner)
    assert (second - ref).norm() <= 1e-10 * ref.norm() and (second - first).norm() > 1e-3


def test_refuses_torch_func_transforms():
    inst = ridge(1, 10.0)
    fn = bilevel.compiled_hypergrad(inst.outer_loss, inner_loss=inst.inner_loss, maxiter=4, backend=BACKEND)
    lams = torch.stack([inst.hparams, inst.hparams])
    with pytest.raises(NotImplementedError, match="compiled_hypergrad: called under torch.func Vmap.*hypergrad"):
        torch.func.vmap(lambda lam: fn(inst.w_star, lam)[0])(lams)
    with pytest.raises(NotImplementedError, match="Grad"):
        torch.func.grad(lambda lam: fn(inst.w_star, lam)[0].sum())(inst.hparams)


def test_a_loss_that_is_not_a_scalar_gets_our_message_not_a_compile_error():
    inst = ridge(0, 10.0)
    vector = bilevel.compiled_hypergrad(lambda w, lam: w * 2.0, inner_loss=inst.inner_loss, maxiter=3,
                                        backend=BACKEND)
    with pytest.raises(ValueError, match="outer_loss should return a scalar tensor"):
        vector(inst.w_star, inst.hparams)
    pair = bilevel.compiled_hypergrad(inst.outer_loss, inner_loss=lambda w, lam: (w.sum(), lam.sum()), maxiter=3,
                                      backend=BACKEND)
    with pytest.raises(ValueError, match="inner_loss should return a scalar tensor"):
        pair(inst.w_star, inst.hparams)


def test_fixed_point_form_matches_hypergrad_and_the_exact_answer():
    """AID-FP in the graph: K iterations v ← (∂_wΦ)ᵀ v + b, the same iterates as the eager
    FixedPoint solver; converged, the exact (I − A)⁻ᵀ answer; damped, hypergrad's damped one."""
    inst = linear_contraction(1, 5.0)  # ‖A‖ = 0.8: 1e-12 in ~125 iterations
    fn = bilevel.compiled_hypergrad(inst.outer_loss, fixed_point=inst.fixed_point, maxiter=160, tol=1e-10,
                                    backend=BACKEND)
    hg, info = fn(inst.w_star, inst.hparams)
    assert (hg - inst.exact).norm() <= 1e-9 * inst.exact.norm()
    assert info.converged and info.iterations == 160 and info.solver == "FixedPoint (compiled)"
    for K, damping in [(7, 0.0), (12, 0.3)]:
        short = bilevel.compiled_hypergrad(inst.outer_loss, fixed_point=inst.fixed_point, maxiter=K, tol=1.0,
                                           damping=damping, backend=BACKEND)
        hg, info = short(inst.w_star, inst.hparams)
        ref, rinfo = bilevel.hypergrad(inst.outer_loss, inst.w_star, inst.hparams, fixed_point=inst.fixed_point,
                                       solver=bilevel.FixedPoint(maxiter=K, tol=0.0), damping=damping,
                                       return_info=True)
        assert (hg - ref).norm() <= 1e-12 * ref.norm() and abs(info.residual - rinfo.residual) <= 1e-12
        assert info.damping == damping and (info.v - rinfo.v).norm() <= 1e-12 * rinfo.v.norm()


@pytest.mark.parametrize("form", ["inner_loss", "fixed_point"])
def test_warm_start_from_the_previous_v(form):
    """init=v starts the compiled solve at v: the same iterates as eager hypergrad(init=v) with
    the same K, and from the previous outer step's v a short solve is as good as a long cold one."""
    inst = logistic(3, 100.0) if form == "inner_loss" else linear_contraction(3, 20.0)
    solver = bilevel.CG if form == "inner_loss" else bilevel.FixedPoint
    lam2 = inst.hparams * 1.01  # the next outer step: nearby hparams, same params (a rough inner)
    cold = bilevel.compiled_hypergrad(inst.outer_loss, **inst.form, maxiter=10 if form == "inner_loss" else 60,
                                      tol=1.0, backend=BACKEND)  # CG on d = 8: exact in 8 iterations
    _, info = cold(inst.w_star, inst.hparams)
    warm = bilevel.compiled_hypergrad(inst.outer_loss, **inst.form, maxiter=3, tol=1.0, inner_tol=math.inf,
                                      backend=BACKEND)
    hg, winfo = warm(inst.w_star, lam2, init=info.v)
    ref, rinfo = bilevel.hypergrad(inst.outer_loss, inst.w_star, lam2, **inst.form, init=info.v,
                                   solver=solver(maxiter=3, tol=0.0), inner_tol=math.inf, return_info=True)
    assert (hg - ref).norm() <= 1e-10 * ref.norm() and abs(winfo.residual - rinfo.residual) <= 1e-10
    _, cold3 = warm(inst.w_star, lam2)  # the same 3 iterations from v = 0: far worse
    assert winfo.residual < 0.1 * cold3.residual
    with pytest.raises(ValueError, match="init should be a pytree with the structure and shapes of params"):
        warm(inst.w_star, lam2, init=info.v[:-1])
    with pytest.raises(ValueError, match="init contains NaN"):
        warm(inst.w_star, lam2, init=info.v * math.nan)


def test_fixed_point_form_refuses_what_the_eager_solver_refuses():
    inst = linear_contraction(2, 5.0)
    A = torch.eye(10, dtype=torch.float64) * 1.2  # spectral radius 1.2: no contraction

    def expanding(w, lam):
        return A @ w + inst.fixed_point(torch.zeros_like(w), lam)

    fn = bilevel.compiled_hypergrad(inst.outer_loss, fixed_point=expanding, maxiter=30, backend=BACKEND)
    with pytest.raises(bilevel.NotContractionError, match="not a contraction"):
        fn(inst.w_star, inst.hparams)
    with pytest.warns(bilevel.ConvergenceWarning, match="FixedPoint .compiled."):
        bilevel.compiled_hypergrad(inst.outer_loss, fixed_point=inst.fixed_point, maxiter=3,
                                   backend=BACKEND)(inst.w_star, inst.hparams)
    with pytest.warns(bilevel.ConvergenceWarning, match="params look far from the inner solution"):
        bilevel.compiled_hypergrad(inst.outer_loss, fixed_point=inst.fixed_point, maxiter=20, tol=1.0,
                                   backend=BACKEND)(inst.w_star + 1.0, inst.hparams)
    with pytest.raises(ValueError, match="fixed_point should return a pytree with the structure and shapes"):
        bilevel.compiled_hypergrad(inst.outer_loss, fixed_point=lambda w, lam: w[:-1], maxiter=3,
                                   backend=BACKEND)(inst.w_star, inst.hparams)
    with pytest.raises(ValueError, match="exactly one"):
        bilevel.compiled_hypergrad(inst.outer_loss, fixed_point=inst.fixed_point, inner_loss=inst.outer_loss,
                                   maxiter=3)
    lonely = {"lam": inst.hparams, "unused": torch.ones(2, dtype=torch.float64)}
    fn = bilevel.compiled_hypergrad(lambda w, h: inst.outer_loss(w, h["lam"]),
                                    fixed_point=lambda w, h: inst.fixed_point(w, h["lam"]), maxiter=5,
                                    tol=1.0, backend=BACKEND)
    with pytest.raises(ValueError, match="unused"):
        fn(inst.w_star, lonely)


def test_many_instances_each_compile_on_their_own():
    """torch.compile's cache is per code object with a recompile limit of 8: a tenth
    compiled_hypergrad (a meta-learner making one per task, say) must not fail for the nine
    before it."""
    inst = ridge(0, 10.0)
    for i in range(10):
        def inner(w, lam, s=1.0 + i):
            return s * inst.inner_loss(w, lam)

        # the limit is dynamo's, before any backend: "eager" (dynamo alone) shows it fastest
        fn = bilevel.compiled_hypergrad(inst.outer_loss, inner_loss=inner, maxiter=2, tol=1.0, backend="eager")
        ref = bilevel.hypergrad(inst.outer_loss, inst.w_star, inst.hparams, inner_loss=inner,
                                solver=bilevel.CG(maxiter=2, tol=0.0), inner_tol=math.inf)
        hg, _ = fn(inst.w_star, inst.hparams)
        assert (hg - ref).norm() <= 1e-10 * ref.norm()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_options_are_checked(bad):
    inst = ridge(0, 10.0)
    with pytest.raises(ValueError, match="maxiter"):
        bilevel.compiled_hypergrad(inst.outer_loss, inner_loss=inst.inner_loss, maxiter=bad)
    with pytest.raises(ValueError, match="damping"):
        bilevel.compiled_hypergrad(inst.outer_loss, inner_loss=inst.inner_loss, maxiter=3, damping=-1.0)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor needs a C++ compiler on CPU")
def test_inductor_matrix_vector_products_pytrees_and_data_in_place(one_thread):
    """The default CPU backend (inductor, matrix–vector products on BLAS, C++ wrapper) generates
    the whole graph without a break: logistic regression with a weight vector and a bias (mv in
    both directions, a two-leaf pytree), data updated in place between calls, against eager
    hypergrad run to convergence."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(60, 7, dtype=torch.float64, generator=gen)
    y = torch.randn(60, dtype=torch.float64, generator=gen).sign()

    def inner(p, lam):
        margin = y * (X @ p["w"] + p["b"])
        return torch.nn.functional.softplus(-margin).mean() + 0.5 * (lam.exp() * p["w"] ** 2).sum() + 0.05 * p["b"] ** 2

    def outer(p, lam):
        return torch.nn.functional.softplus(-(X[:30] @ p["w"] + p["b"]) * y[:30]).mean()

    def fit(lam):
        p = {"w": torch.zeros(7, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
        return bilevel.lbfgs(inner, p, lam, tol=1e-12)[0]

    fn = bilevel.compiled_hypergrad(outer, inner_loss=inner, maxiter=8, tol=1e-8)
    lam = torch.linspace(-2.0, 1.0, 7, dtype=torch.float64)
    for _ in range(2):
        p = fit(lam)
        hg, info = fn(p, lam)
        ref = bilevel.hypergrad(outer, p, lam, inner_loss=inner, solver=bilevel.CG(maxiter=50, tol=1e-13))
        assert (hg - ref).norm() <= 1e-9 * ref.norm() and info.converged and set(info.v) == {"w", "b"}
        X.copy_(torch.randn(60, 7, dtype=torch.float64, generator=gen))  # the next call must see new data


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor needs a C++ compiler on CPU")
def test_inductor_fixed_point_form_on_a_deq_layer(one_thread):
    """A DEQ layer w = tanh(W w + U x + b) (‖W‖ = 0.6), hparams {U, b}: the compiled AID-FP
    against eager hypergrad with GMRES to 1e-13 and central finite differences of the
    outer loss through the fixed-point solve."""
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(8, 8, dtype=torch.float64, generator=gen)
    W = 0.6 * W / torch.linalg.matrix_norm(W, ord=2)
    x, t = torch.randn(5, dtype=torch.float64, generator=gen), torch.randn(8, dtype=torch.float64, generator=gen)

    def phi(w, h):
        return torch.tanh(W @ w + h["U"] @ x + h["b"])

    def outer(w, h):
        return 0.5 * ((w - t) ** 2).sum()

    def solve(h):
        w = torch.zeros(8, dtype=torch.float64)
        for _ in range(200):
            w = phi(w, h)
        return w

    h = {"U": 0.3 * torch.randn(8, 5, dtype=torch.float64, generator=gen),
         "b": 0.1 * torch.randn(8, dtype=torch.float64, generator=gen)}
    fn = bilevel.compiled_hypergrad(outer, fixed_point=phi, maxiter=80, tol=1e-12)
    hg, info = fn(solve(h), h)
    ref = bilevel.hypergrad(outer, solve(h), h, fixed_point=phi, solver=bilevel.GMRES(tol=1e-13))
    for k in ("U", "b"):
        assert (hg[k] - ref[k]).norm() <= 1e-10 * ref[k].norm()
    assert info.converged and info.solver == "FixedPoint (compiled)"
    e = torch.zeros(8, dtype=torch.float64)
    e[3] = 1e-6
    fd = (outer(solve({**h, "b": h["b"] + e}), h) - outer(solve({**h, "b": h["b"] - e}), h)) / 2e-6
    assert abs(hg["b"][3] - fd) <= 1e-7 * max(1.0, abs(fd))

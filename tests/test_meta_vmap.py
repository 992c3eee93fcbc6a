"""vmap over a meta-batch: hypergrad, implicit and unroll on B tasks at once equal the
Python loop over the tasks, and the exact float64 meta-gradient.

Tasks are linear regressions (X_i, y_i, X_i^v, y_i^v); the meta-parameter θ ∈ R^d is shared
(unbatched: ``in_dims=None``), the meta-gradient is the mean over tasks of ∇_θ f_i(w_i(θ)):

* iMAML (proximal inner): w_i(θ) = argmin ½ mean(X_i w − y_i)² + λ/2‖w − θ‖²
  = (X_iᵀX_i/n + λI)⁻¹(X_iᵀy_i/n + λθ), so ∇_θ f_i = λ(X_iᵀX_i/n + λI)⁻¹∇f_i(w_i);
* MAML (unrolled GD from θ): w_T = M^T θ + Σ_{t<T} M^t η X_iᵀy_i/n with M = I − ηX_iᵀX_i/n,
  so ∇_θ f_i = (M^T)ᵀ ∇f_i(w_T).
"""

import warnings

import pytest
import torch
from torch.func import grad, vmap

import bilevel as bl

F64 = torch.float64
B, N, D, LAM, ETA, T = 5, 12, 4, 0.7, 0.2, 15


def _tasks(seed=0):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(B, N, D, generator=g, dtype=F64), torch.randn(B, N, D, generator=g, dtype=F64)
    w_true = torch.randn(B, D, generator=g, dtype=F64)
    y = torch.einsum("bnd,bd->bn", X, w_true) + 0.1 * torch.randn(B, N, generator=g, dtype=F64)
    yv = torch.einsum("bnd,bd->bn", Xv, w_true) + 0.1 * torch.randn(B, N, generator=g, dtype=F64)
    theta = torch.randn(D, generator=g, dtype=F64)
    return theta, (X, y, Xv, yv)


def inner_loss(w, theta, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * LAM * ((w - theta) ** 2).sum()


def outer_loss(w, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean()


def prox_solution(theta, X, y):
    return torch.linalg.solve(X.T @ X / N + LAM * torch.eye(D, dtype=F64), X.T @ y / N + LAM * theta)


def exact_imaml(theta, X, y, Xv, yv):
    A = X.T @ X / N + LAM * torch.eye(D, dtype=F64)
    return LAM * torch.linalg.solve(A, grad(outer_loss)(prox_solution(theta, X, y), Xv, yv))


def exact_maml(theta, X, y, Xv, yv):
    M = torch.eye(D, dtype=F64) - ETA * X.T @ X / N
    w = theta
    for _ in range(T):
        w = M @ w + ETA * X.T @ y / N
    return torch.linalg.matrix_power(M, T).T @ grad(outer_loss)(w, Xv, yv)


def _loop(fn, theta, data):
    return torch.stack([fn(theta, *task) for task in zip(*data, strict=True)])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _no_warnings():
    return warnings.catch_warnings(record=True)


@pytest.mark.parametrize("solver", [bl.CG(maxiter=20, tol=1e-13), bl.GMRES(maxiter=20, tol=1e-13), bl.Dense()],
                         ids=lambda s: type(s).__name__)
def test_hypergrad_over_a_meta_batch(solver):
    theta, data = _tasks()

    def task(theta, X, y, Xv, yv):
        w = prox_solution(theta, X, y)
        return bl.hypergrad(lambda w, th: outer_loss(w, Xv, yv), w, theta,
                            inner_loss=lambda w, th: inner_loss(w, th, X, y), solver=solver)

    with _no_warnings() as caught:
        warnings.simplefilter("always")
        batched = vmap(task, in_dims=(None, 0, 0, 0, 0))(theta, *data)
    assert not [w for w in caught if issubclass(w.category, bl.ConvergenceWarning)]
    looped = _loop(task, theta, data)
    exact = _loop(exact_imaml, theta, data)
    assert _rel(batched, looped) <= 1e-12
    assert _rel(batched, exact) <= 1e-10
    assert _rel(batched.mean(0), exact.mean(0)) <= 1e-10  # the meta-gradient


def test_hypergrad_info_is_per_task_under_vmap():
    theta, data = _tasks(1)

    def task(theta, X, y, Xv, yv):
        w = prox_solution(theta, X, y)
        return bl.hypergrad(lambda w, th: outer_loss(w, Xv, yv), w, theta,
                            inner_loss=lambda w, th: inner_loss(w, th, X, y), solver=bl.CG(maxiter=D, tol=0.0),
                            return_info=True)

    hg, info = vmap(task, in_dims=(None, 0, 0, 0, 0))(theta, *data)
    assert info.outer_loss.shape == (B,) and info.v.shape == (B, D)
    losses = torch.stack([outer_loss(prox_solution(theta, X, y), Xv, yv) for X, y, Xv, yv in zip(*data)])
    assert torch.allclose(info.outer_loss, losses, rtol=1e-12)
    assert _rel(hg, _loop(exact_imaml, theta, data)) <= 1e-9  # D CG steps: exact in exact arithmetic


def test_implicit_over_a_meta_batch_inside_grad():
    # the iMAML meta-loss as a function of θ: grad(mean over the vmapped tasks)
    theta, data = _tasks(2)

    @bl.implicit(inner_loss=inner_loss, solver=bl.CG(maxiter=20, tol=1e-13))
    def adapt(w0, theta, X, y):  # any inner solver; the closed form here
        return prox_solution(theta, X, y)

    def task_loss(theta, X, y, Xv, yv):
        return outer_loss(adapt(theta, theta, X, y), Xv, yv)

    def meta_loss(theta):
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(theta, *data).mean()

    got = grad(meta_loss)(theta)
    per_task = _loop(lambda th, *t: grad(task_loss)(th, *t), theta, data)
    exact = _loop(exact_imaml, theta, data).mean(0)
    assert _rel(got, per_task.mean(0)) <= 1e-12
    assert _rel(got, exact) <= 1e-10
    # per-task meta-gradients, vmapped, too
    assert _rel(vmap(grad(task_loss), in_dims=(None, 0, 0, 0, 0))(theta, *data), per_task) <= 1e-12
    # and plain autograd: .backward() through the vmapped implicit solver
    th = theta.clone().requires_grad_()
    meta_loss(th).backward()
    assert _rel(th.grad, exact) <= 1e-10


@pytest.mark.parametrize("options", [{}, {"checkpoint": True}], ids=["full", "checkpoint"])
def test_unroll_over_a_meta_batch(options):
    theta, data = _tasks(3)

    def task_loss(theta, X, y, Xv, yv):
        def step(w, th):  # GD on the plain task loss (MAML: no proximal term)
            return w - ETA * X.T @ (X @ w - y) / N

        return outer_loss(bl.unroll(step, theta, theta, T, **options), Xv, yv)

    def meta_loss(theta):
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(theta, *data).mean()

    got = grad(meta_loss)(theta)
    looped = _loop(lambda th, *t: grad(task_loss)(th, *t), theta, data)
    exact = _loop(exact_maml, theta, data)
    assert _rel(got, looped.mean(0)) <= 1e-12
    assert _rel(got, exact.mean(0)) <= 1e-10
    assert _rel(vmap(grad(task_loss), in_dims=(None, 0, 0, 0, 0))(theta, *data), exact) <= 1e-10


def test_unroll_truncated_over_a_meta_batch_equals_the_loop():
    # first-order-like: only the last K steps recorded; no closed form needed, the loop is the reference
    theta, data = _tasks(4)

    def task_loss(theta, X, y, Xv, yv):
        def step(w, th):
            return w - ETA * (X.T @ (X @ w - y) / N + LAM * (w - th))

        return outer_loss(bl.unroll(step, torch.zeros_like(theta), theta, T, truncate=3), Xv, yv)

    got = vmap(grad(task_loss), in_dims=(None, 0, 0, 0, 0))(theta, *data)
    looped = _loop(lambda th, *t: grad(task_loss)(th, *t), theta, data)
    assert _rel(got, looped) <= 1e-12


def test_mlp_meta_batch_hypergrad_against_a_dense_hessian_solve():
    # nonlinear: an MLP 1-8-1 per task, proximal inner problem solved by many GD steps
    # (vmapped), hypergrad under vmap vs the loop vs a dense float64 Hessian solve
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(F64)
    theta = bl.nn.tensors(net)
    g = torch.Generator().manual_seed(5)
    amp, phase = torch.rand(B, 1, 1, generator=g, dtype=F64) + 0.5, 3 * torch.rand(B, 1, 1, generator=g, dtype=F64)
    x = 10 * torch.rand(B, N, 1, generator=g, dtype=F64) - 5
    xv = 10 * torch.rand(B, N, 1, generator=g, dtype=F64) - 5
    y, yv = amp * torch.sin(x + phase), amp * torch.sin(xv + phase)
    lam = 2.0

    def task_inner(w, th, x, y):
        prox = sum(((w[k] - th[k]) ** 2).sum() for k in w)
        return ((bl.nn.call(net, w, x) - y) ** 2).mean() + 0.5 * lam * prox

    def task_outer(w, xv, yv):
        return ((bl.nn.call(net, w, xv) - yv) ** 2).mean()

    def solve(th, x, y):
        w = dict(th)
        for _ in range(300):
            gw = grad(task_inner)(w, th, x, y)
            w = {k: w[k] - 0.1 * gw[k] for k in w}
        return w

    def task(th, x, y, xv, yv):
        w = solve(th, x, y)
        return bl.hypergrad(lambda w, th: task_outer(w, xv, yv), w, th,
                            inner_loss=lambda w, th: task_inner(w, th, x, y), solver=bl.CG(maxiter=60, tol=1e-12))

    batched = vmap(task, in_dims=(None, 0, 0, 0, 0))(theta, x, y, xv, yv)
    names = list(theta)
    flat = lambda d: torch.cat([d[k].reshape(-1) for k in names])  # noqa: E731
    for i in range(2):  # two of the tasks: each check solves its inner problem again
        looped = task(theta, x[i], y[i], xv[i], yv[i])
        w = solve(theta, x[i], y[i])
        shapes = [w[k].shape for k in names]

        def unflat(v, shapes=shapes):
            out, o = {}, 0
            for k, s in zip(names, shapes):
                out[k] = v[o:o + s.numel()].reshape(s)
                o += s.numel()
            return out

        H = torch.func.hessian(lambda v, xi=x[i], yi=y[i]: task_inner(unflat(v), theta, xi, yi))(flat(w))
        gf = flat(grad(task_outer)(w, xv[i], yv[i]))
        exact = lam * torch.linalg.solve(H, gf)  # −∂²_{θw} g = λI
        assert _rel(flat({k: batched[k][i] for k in names}), flat(looped)) <= 1e-10
        assert _rel(flat(looped), exact) <= 1e-8


def test_meta_benchmark_smoke(tmp_path):
    # benchmarks/meta.py at a tiny size: every method that ran agrees with the hand-written
    # torch.func meta-gradient in float64 (TorchOpt / higher rows say why when not installed)
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import meta

    out = tmp_path / "meta.json"
    assert meta.main(["--quick", "--tasks", "2", "--repeats", "1", "--no-memory", "--threads", "1",
                      "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    ran = [r for r in rows if "error" not in r]
    assert {(r["family"], r["method"]) for r in ran} >= {(f, m) for f in ("iMAML", "MAML")
                                                        for m in ("bilevel vmap", "hand vmap")}
    for r in ran:
        assert r["rel_err_float64_vs_hand"] <= 1e-6, r
        assert r["median_ms"] > 0

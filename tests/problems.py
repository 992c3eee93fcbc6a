"""Bilevel problems whose hypergradient is known exactly (closed form or dense float64 solve).

Each problem gives: ``params`` at the inner solution, ``hparams``, ``inner_loss`` and/or
``fixed_point``, ``outer_loss``, a gradient ``step`` for ITD, and ``exact`` (the true
hypergradient, same structure as ``hparams``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Problem:
    name: str
    params: Any
    hparams: Any
    outer_loss: Callable
    exact: Any
    inner_loss: Callable | None = None
    fixed_point: Callable | None = None
    step: Callable | None = None  # a contraction whose fixed point is the inner solution
    params0: Any = None


def _data(n, d, seed, dtype=torch.float64):
    # drawn in float64 and cast, so the float32 problem is the same problem
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return X.to(dtype), y.to(dtype), g


def ridge(n=40, d=8, seed=0, dtype=torch.float64) -> Problem:
    """g = ½‖Xw − y‖²/n + ½ Σ e^{λ_j} w_j²,  f = ½‖X_v w − y_v‖²/n_v."""
    X, y, g = _data(n, d, seed, dtype)
    Xv, yv, _ = _data(n, d, seed + 100, dtype)
    lam = (0.3 * torch.randn(d, generator=g, dtype=torch.float64) - 1.0).to(dtype)
    A = X.T @ X / n + torch.diag(lam.exp())
    w = torch.linalg.solve(A, X.T @ y / n)
    gw = Xv.T @ (Xv @ w - yv) / n
    exact = -lam.exp() * w * torch.linalg.solve(A, gw)

    def inner_loss(w, lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(w, lam):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    L = torch.linalg.eigvalsh(A).max().item()
    eta = 1.0 / L

    def step(w, lam):
        return w - eta * (X.T @ (X @ w - y) / n + lam.exp() * w)

    return Problem("ridge", w, lam, outer_loss, exact, inner_loss, step, step, torch.zeros_like(w))


def logistic_losses(X, y, Xv, yv):
    """Per-feature-L2 logistic regression: ``g = mean log(1 + e^{−y·Xw}) + ½ Σ e^{λ_j} w_j²``
    on ``(X, y)``, ``f`` the same data loss on ``(Xv, yv)``."""

    def data_loss(w, X, y):
        return torch.nn.functional.softplus(-y * (X @ w)).mean()

    def inner_loss(w, lam):
        return data_loss(w, X, y) + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(w, lam):
        return data_loss(w, Xv, yv)

    return inner_loss, outer_loss


def logistic(n=60, d=6, seed=1, dtype=torch.float64) -> Problem:
    """g = mean log(1 + e^{−y·Xw}) + ½ Σ e^{λ_j} w_j²,  f = same data loss on validation."""
    X, _, g = _data(n, d, seed, dtype)
    y = torch.sign(X.double() @ torch.randn(d, generator=g, dtype=torch.float64)
                   + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    Xv, _, _ = _data(n, d, seed + 100, dtype)
    yv = torch.sign(Xv[:, 0] + 0.1)
    lam = torch.linspace(-3, -1, d, dtype=dtype)
    inner_loss, outer_loss = logistic_losses(X, y, Xv, yv)
    w = newton(inner_loss, torch.zeros(d, dtype=dtype), lam)
    H = torch.func.hessian(inner_loss)(w, lam)
    gw = torch.func.grad(outer_loss)(w, lam)
    exact = -lam.exp() * w * torch.linalg.solve(H, gw)
    eta = 1.0 / torch.linalg.eigvalsh(H).max().item()

    def step(w, lam):
        return w - eta * torch.func.grad(inner_loss)(w, lam)

    return Problem("logistic", w, lam, outer_loss, exact, inner_loss, step, step, torch.zeros_like(w))


def linear_fixed_point(d=10, m=4, seed=2, q=0.8, dtype=torch.float64) -> Problem:
    """Φ(w, λ) = A w + B λ + c with non-symmetric A, ‖A‖₂ = q < 1;  f = ½‖w − t‖² + 0.05‖λ‖²."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = (q * A / torch.linalg.matrix_norm(A, ord=2)).to(dtype)
    B, c, t, lam = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in [(d, m), (d,), (d,), (m,)])
    w, exact, fixed_point, outer_loss = linear_fp_parts(A, B, c, t, lam)
    return Problem("linear_fp", w, lam, outer_loss, exact, None, fixed_point, fixed_point, torch.zeros_like(w))


def linear_fp_parts(A, B, c, t, lam):
    """For Φ(w, λ) = A w + B λ + c and f = ½‖w − t‖² + 0.05‖λ‖²: the fixed point w*, the exact
    hypergradient ``Bᵀ (I − A)⁻ᵀ (w* − t) + 0.1 λ``, Φ and f."""
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    w = torch.linalg.solve(eye - A, B @ lam + c)
    exact = B.T @ torch.linalg.solve((eye - A).T, w - t) + 0.1 * lam

    def fixed_point(w, lam):
        return A @ w + B @ lam + c

    def outer_loss(w, lam):
        return 0.5 * ((w - t) ** 2).sum() + 0.05 * (lam**2).sum()

    return w, exact, fixed_point, outer_loss


def ridge_dict(seed=3, dtype=torch.float64) -> Problem:
    """Ridge with params {'a': w[:3], 'b': w[3:].reshape(2, 2)} and hparams as a nested pytree."""
    p = ridge(n=30, d=7, seed=seed, dtype=dtype)
    X_inner, flat_lam = p.inner_loss, p.hparams

    def to_w(tree):
        return torch.cat([tree["a"], tree["b"].reshape(-1)])

    def to_lam(tree):
        return torch.cat([tree[0]["scale"].reshape(-1), tree[1]])

    def split_w(w):
        return {"a": w[:3], "b": w[3:].reshape(2, 2)}

    def split_lam(lam):
        return ({"scale": lam[:2].reshape(1, 2)}, lam[2:])

    step = p.step
    return Problem(
        "ridge_dict",
        split_w(p.params),
        split_lam(flat_lam),
        lambda w, lam: p.outer_loss(to_w(w), to_lam(lam)),
        split_lam(p.exact),
        lambda w, lam: X_inner(to_w(w), to_lam(lam)),
        lambda w, lam: split_w(step(to_w(w), to_lam(lam))),
        lambda w, lam: split_w(step(to_w(w), to_lam(lam))),
        split_w(torch.zeros_like(p.params)),
    )


def newton(loss, w0, lam, iters=200, tol=1e-15):
    """Damped Newton with dense Hessian in float64, to machine precision (small problems)."""
    w = w0.clone()
    for _ in range(iters):
        gr = torch.func.grad(loss)(w, lam)
        if gr.norm() < tol:
            break
        H = torch.func.hessian(loss)(w, lam)
        ev_min = torch.linalg.eigvalsh(H).min()
        if ev_min <= 0:  # non-convex: shift to a descent direction (modified Newton)
            H = H + (1e-3 - ev_min) * torch.eye(len(w), dtype=w.dtype)
        dw = torch.linalg.solve(H, gr)
        t = 1.0
        f0 = loss(w, lam)
        while loss(w - t * dw, lam) > f0 + 1e-12 and t > 1e-8:
            t *= 0.5
        w = w - t * dw
    return w


def rel_err(a, b) -> float:
    la, _ = torch.utils._pytree.tree_flatten(a)
    lb, _ = torch.utils._pytree.tree_flatten(b)
    va = torch.cat([t.reshape(-1) for t in la])
    vb = torch.cat([t.reshape(-1) for t in lb])
    return ((va - vb).norm() / vb.norm()).item()

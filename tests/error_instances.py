"""Random bilevel instances with exact hypergradients, for the error-estimate and budget tests.

Each :class:`Instance` holds the inner solution ``w_star`` and the exact ``∇F(λ)`` (closed
form or a dense float64 solve at ``w_star``), an inner iteration ``step`` (a contraction
whose fixed point is ``w_star``: a gradient or proximal-gradient step, or Φ itself) and the
form to differentiate (``inner_loss`` or ``fixed_point``).  ``kappa`` sets the conditioning:
of the inner Hessian (optimality form), or ``1/(1 − ‖∂_wΦ‖)`` (fixed-point form), from 2
to 1e4.  Families: ridge, logistic, a non-symmetric linear contraction, Lasso through a
proximal-gradient map, a small tanh MLP at a strict local minimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from problems import linear_fp_parts, logistic_losses, newton

F64 = torch.float64


@dataclass
class Instance:
    name: str
    kappa: float
    w_star: torch.Tensor
    hparams: torch.Tensor
    exact: torch.Tensor
    outer_loss: Callable
    step: Callable  # one inner iteration
    w0: torch.Tensor
    inner_loss: Callable | None = None
    fixed_point: Callable | None = None

    @property
    def form(self) -> dict[str, Any]:
        return {"inner_loss": self.inner_loss} if self.inner_loss is not None else {"fixed_point": self.fixed_point}

    def run_inner(self, steps: int) -> torch.Tensor:
        w = self.w0.clone()
        with torch.no_grad():
            for _ in range(steps):
                w = self.step(w, self.hparams)
        return w


def _spectrum_basis(d: int, kappa: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    ev = torch.logspace(0, -math.log10(kappa), d, dtype=F64)  # eigenvalues from 1 down to 1/kappa
    return q, ev


def ridge(seed: int, kappa: float, d: int = 10) -> Instance:
    """g = ½ wᵀQw − pᵀw + ½ Σ e^{λ_j} w_j²; f = ½‖Bw − c‖²; κ(H) ≈ kappa."""
    g = torch.Generator().manual_seed(seed)
    q, ev = _spectrum_basis(d, kappa, g)
    lam = torch.log(ev.min() * (0.2 + 0.3 * torch.rand(d, generator=g, dtype=F64)))
    Q = q @ torch.diag(ev) @ q.T
    p = torch.randn(d, generator=g, dtype=F64)
    B, c = torch.randn(d, d, generator=g, dtype=F64) / d**0.5, torch.randn(d, generator=g, dtype=F64)
    H = Q + torch.diag(lam.exp())
    w = torch.linalg.solve(H, p)
    exact = -lam.exp() * w * torch.linalg.solve(H, B.T @ (B @ w - c))
    eta = 1 / torch.linalg.eigvalsh(H).max().item()

    def inner_loss(w, lam):
        return 0.5 * w @ Q @ w - p @ w + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(w, lam):
        return 0.5 * ((B @ w - c) ** 2).sum()

    def step(w, lam):
        return w - eta * (Q @ w - p + lam.exp() * w)

    return Instance("ridge", kappa, w, lam, exact, outer_loss, step, torch.zeros(d, dtype=F64), inner_loss=inner_loss)


def logistic(seed: int, kappa: float, d: int = 8, n: int = 40) -> Instance:
    """Per-feature L2 logistic regression; columns scaled so that κ(H) ≈ kappa."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -0.5 * math.log10(kappa), d, dtype=F64)
    X = torch.randn(n, d, generator=g, dtype=F64) * scale
    y = torch.sign(X @ torch.randn(d, generator=g, dtype=F64) + 0.5 * torch.randn(n, generator=g, dtype=F64))
    Xv = torch.randn(n, d, generator=g, dtype=F64) * scale
    yv = torch.sign(Xv @ torch.randn(d, generator=g, dtype=F64))
    lam = torch.log(0.25 * scale.min() ** 2 * (0.5 + torch.rand(d, generator=g, dtype=F64)))
    inner_loss, outer_loss = logistic_losses(X, y, Xv, yv)

    def grad_g(w, lam):  # analytic: the tests run thousands of inner steps
        return -X.T @ (y * torch.sigmoid(-y * (X @ w))) / n + lam.exp() * w

    def hess_g(w, lam):
        s = torch.sigmoid(X @ w)
        return X.T @ (X * (s * (1 - s))[:, None]) / n + torch.diag(lam.exp())

    w = torch.zeros(d, dtype=F64)
    for _ in range(100):  # Newton (convex, well-damped by the L2 term): to machine precision
        gr = grad_g(w, lam)
        if gr.norm() < 1e-15:
            break
        w = w - torch.linalg.solve(hess_g(w, lam), gr)
    H = hess_g(w, lam)
    exact = -lam.exp() * w * torch.linalg.solve(H, torch.func.grad(outer_loss)(w, lam))
    eta = 1 / torch.linalg.eigvalsh(H).max().item()  # 1/L at w*: the iteration contracts near w*

    def step(w, lam):
        return w - eta * grad_g(w, lam)

    ev = torch.linalg.eigvalsh(H)
    return Instance("logistic", (ev.max() / ev.min()).item(), w, lam, exact, outer_loss, step,
                    torch.zeros(d, dtype=F64), inner_loss=inner_loss)


def linear_contraction(seed: int, kappa: float, d: int = 10, m: int = 4) -> Instance:
    """Φ(w, λ) = A w + B λ + c, A non-symmetric with ‖A‖₂ = 1 − 1/kappa; f = ½‖w − t‖² + ½·0.1‖λ‖²."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=F64)
    # a slow, nearly normal direction too, so that 1/(1 − q) is felt, not only ‖A‖
    u = torch.randn(d, generator=g, dtype=F64)
    u = u / u.norm()
    A = 0.5 * A / torch.linalg.matrix_norm(A, ord=2) + 0.5 * torch.outer(u, u)
    A = (1 - 1 / kappa) * A / torch.linalg.matrix_norm(A, ord=2)
    B = torch.randn(d, m, generator=g, dtype=F64)
    c, t = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    lam = torch.randn(m, generator=g, dtype=F64)
    w, exact, fixed_point, outer_loss = linear_fp_parts(A, B, c, t, lam)
    return Instance("linear_fp", kappa, w, lam, exact, outer_loss, fixed_point, torch.zeros(d, dtype=F64),
                    fixed_point=fixed_point)


def lasso(seed: int, kappa: float, d: int = 12, n: int = 30) -> Instance:
    """Lasso, Φ(w, λ) = soft_threshold(w − η∇ℓ(w), η e^λ); exact: on the support S,
    w_S = Q_SS⁻¹(p_S − e^λ sign w_S), so ∂w_S/∂λ = −e^λ Q_SS⁻¹ sign w_S."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -0.5 * math.log10(kappa), d, dtype=F64)
    X = torch.randn(n, d, generator=g, dtype=F64) * scale
    w_true = torch.randn(d, generator=g, dtype=F64) * (torch.rand(d, generator=g, dtype=F64) < 0.5)
    y = X @ w_true + 0.1 * torch.randn(n, generator=g, dtype=F64)
    Q, p = X.T @ X / n, X.T @ y / n
    L = torch.linalg.eigvalsh(Q).max().item()
    eta = 1 / L
    lam = torch.log(0.05 * p.abs().max()).reshape(1)
    Xv = torch.randn(n, d, generator=g, dtype=F64) * scale
    yv = Xv @ w_true

    def fixed_point(w, lam):
        u = w - eta * (Q @ w - p)
        thr = eta * lam.exp()
        return torch.sign(u) * torch.clamp(u.abs() - thr, min=0)

    def outer_loss(w, lam):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    w = torch.zeros(d, dtype=F64)
    for _ in range(300):  # prox-gradient until the support settles, then the KKT system on it, exactly
        for _ in range(100):
            w = fixed_point(w, lam)
        S = w != 0
        ws = torch.linalg.solve(Q[S][:, S], p[S] - lam.exp() * torch.sign(w[S]))
        polished = torch.zeros(d, dtype=F64)
        polished[S] = ws
        if (fixed_point(polished, lam) - polished).norm() < 1e-13 * max(1.0, ws.norm().item()):
            break
    w = polished
    assert (fixed_point(w, lam) - w).norm() < 1e-12 * max(1.0, w.norm().item()), "lasso: no exact solution found"
    dws = -lam.exp() * torch.linalg.solve(Q[S][:, S], torch.sign(w[S]))
    gw = torch.func.grad(outer_loss)(w, lam)
    exact = (gw[S] @ dws).reshape(1)
    ev = torch.linalg.eigvalsh(Q[S][:, S])
    return Instance("lasso", (ev.max() / ev.min()).item(), w, lam, exact, outer_loss, fixed_point,
                    torch.zeros(d, dtype=F64), fixed_point=fixed_point)


def mlp(seed: int, kappa: float = 0.0, n: int = 24) -> Instance:
    """A 2-4-1 tanh network (17 weights), g = MSE + ½ Σ_l e^{λ_l} ‖W_l‖² (λ per layer);
    w* a strict local minimum by damped Newton; exact ∇F by a dense Hessian solve."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g, dtype=F64)
    y = torch.sin(X[:, 0]) + 0.5 * X[:, 1]
    Xv = torch.randn(n, 2, generator=g, dtype=F64)
    yv = torch.sin(Xv[:, 0]) + 0.5 * Xv[:, 1]
    lam = torch.log(torch.tensor([1e-2, 1e-2], dtype=F64) * (0.5 + torch.rand(2, generator=g, dtype=F64)))

    def net(w, X):
        W1, b1, W2, b2 = w[:8].reshape(4, 2), w[8:12], w[12:16], w[16]
        return torch.tanh(X @ W1.T + b1) @ W2 + b2

    def inner_loss(w, lam):
        return ((net(w, X) - y) ** 2).mean() + 0.5 * (lam[0].exp() * (w[:12] ** 2).sum()
                                                       + lam[1].exp() * (w[12:] ** 2).sum())

    def outer_loss(w, lam):
        return ((net(w, Xv) - yv) ** 2).mean()

    w = newton(inner_loss, 0.5 * torch.randn(17, generator=g, dtype=F64), lam, iters=500)
    H = torch.func.hessian(inner_loss)(w, lam)
    ev = torch.linalg.eigvalsh(H)
    assert ev.min() > 0 and torch.func.grad(inner_loss)(w, lam).norm() < 1e-12, "not a strict local minimum"
    gw = torch.func.grad(outer_loss)(w, lam)
    cross = torch.func.jacrev(torch.func.grad(inner_loss), argnums=1)(w, lam)  # ∂λ ∇_w g: 17×2
    exact = -cross.T @ torch.linalg.solve(H, gw)
    eta = 1 / ev.max().item()
    grad_g = torch.func.grad(inner_loss)
    start = w + 0.05 * w.norm() * torch.randn(17, generator=g, dtype=F64) / 17**0.5  # near w*

    def step(w, lam):
        return w - eta * grad_g(w, lam)

    return Instance("mlp", (ev.max() / ev.min()).item(), w, lam, exact, outer_loss, step, start,
                    inner_loss=inner_loss)


FAMILIES = {"ridge": ridge, "logistic": logistic, "linear_fp": linear_contraction, "lasso": lasso, "mlp": mlp}
KAPPAS = (2.0, 10.0, 100.0, 1e3, 1e4)


def truncated(inst: Instance, seed: int) -> tuple[torch.Tensor, int, str]:
    """An inexact inner point and a linear-solver budget K, drawn at random (reproducibly).

    Half warm (an outer loop's warm start): ``w* + ρ‖w*‖u`` (``u`` a random unit vector,
    ``ρ`` log-uniform in [1e-6, 1e-1]; 1e-2 for the MLP) followed by 0–20 inner steps; half
    cold (ridge, logistic, linear_fp): ``T`` inner steps from 0, ``T`` log-uniform in
    [1, 10κ] (at most 3000).  ``K`` uniform in 1..d."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(3, generator=g, dtype=F64)
    d = inst.w_star.numel()
    K = 1 + int(u[2] * d)
    if inst.name in ("ridge", "logistic", "linear_fp") and u[0] < 0.5:
        T = int(math.exp(u[1].item() * math.log(min(10 * inst.kappa, 3000))))
        return inst.run_inner(T), K, f"cold T={T}"
    top = 1e-2 if inst.name == "mlp" else 1e-1
    rho = math.exp(math.log(1e-6) + u[1].item() * (math.log(top) - math.log(1e-6)))
    dirn = torch.randn(d, generator=g, dtype=F64)
    w = inst.w_star + rho * max(inst.w_star.norm().item(), 1e-3) * dirn / dirn.norm()
    T = int(torch.randint(0, 21, (1,), generator=g))
    with torch.no_grad():
        for _ in range(T):
            w = inst.step(w, inst.hparams)
    return w, K, f"warm rho={rho:.0e} T={T}"

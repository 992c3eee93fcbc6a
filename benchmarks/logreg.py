"""Hypergradients of per-feature-L2 logistic regression: bilevel vs TorchOpt vs JAXopt.

The problem (binary labels ±1, standardized synthetic features, one λ_j per feature)::

    inner  g(w, λ) = mean_i log(1 + exp(−y_i x_iᵀw)) + ½ Σ_j e^{λ_j} w_j²
    outer  f(w)    = the same data loss on a validation set (n/2 rows)
    F(λ) = f(w(λ)),  w(λ) = argmin_w g(w, λ)

Every method runs the same work: T gradient-descent steps ``w ← w − η ∇_w g`` from
``w = 0`` (η = 0.5), then K linear-solver steps (tol = 0, so exactly K).  Timed, side
by side in one process, with equal thread counts:

* the full pipeline (inner solve + hypergradient) and
* the hypergradient step alone (given the same w_T; for ITD: the backward pass),

for our AID-FP, AID-CG, Neumann and ITD, a hand-written analytic baseline (T analytic GD
steps, K analytic Hessian–vector products in CG, two gradients: the work any method must
do), TorchOpt's ``custom_root`` + CG and JAXopt's ``custom_root`` + CG under ``jax.jit``.
Each hypergradient is compared with the exact one (inner problem solved to machine
precision by Newton in float64, dense Hessian solve); with T = 200 the inner solution is
approximate, so every error includes the inner error (printed as "inner rel. err").

Optional second table (``--tta 1e-6``): time to reach a relative error ≤ the target,
each method with the smallest (T, K) from a doubling schedule that reaches it.

    python benchmarks/logreg.py                       # n×d = 2000×200 and 10000×1000
    python benchmarks/logreg.py --quick               # one small size, 3 repeats
    python benchmarks/logreg.py --sizes 2000x200 --threads 1 --dtype float32 --out r.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import Timing, _dist_version, configure_threads, format_table, machine_info, time_call, write_json

import bilevel

PEERS = ("TorchOpt", "JAXopt")
OURS_REFERENCE = "AID-CG"  # the method the ours/peer ratios are printed for


def _sync(out: Any) -> Any:
    """Wait for a CUDA result before the clock stops (a no-op on the CPU)."""
    if isinstance(out, torch.Tensor) and out.is_cuda:
        torch.cuda.synchronize()
    return out


# --------------------------------------------------------------------------- problem


@dataclass(frozen=True)
class Data:
    """Training (X, y), validation (Xv, yv) and λ, as float64 numpy arrays; y ∈ {−1, +1}."""

    X: np.ndarray
    y: np.ndarray
    Xv: np.ndarray
    yv: np.ndarray
    lam: np.ndarray


def make_data(n: int, d: int, seed: int = 0) -> Data:
    """Gaussian features standardized with the training statistics; 20% of them informative.

    Labels come from a sparse linear model plus noise (so neither set is separable);
    ``e^{λ_j}`` is log-uniform in [1e-3, 1e-1].
    """
    rng = np.random.default_rng(seed)
    nv = max(n // 2, 2)
    Z = rng.standard_normal((n + nv, d))
    Z = (Z - Z[:n].mean(0)) / Z[:n].std(0)
    informative = rng.random(d) < 0.2
    w_true = rng.standard_normal(d) * informative
    logits = 2.0 * Z @ w_true / math.sqrt(max(int(informative.sum()), 1))
    labels = np.where(logits + 0.5 * rng.standard_normal(n + nv) > 0, 1.0, -1.0)
    lam = np.log(10.0 ** rng.uniform(-3, -1, d))
    return Data(Z[:n], labels[:n], Z[n:], labels[n:], lam)


@dataclass(frozen=True)
class Exact:
    """The exact hypergradient and the inner solution it is taken at (float64)."""

    hypergrad: torch.Tensor
    params: torch.Tensor
    newton_iterations: int
    grad_norm: float
    seconds: float


def exact_hypergrad(data: Data, tol: float = 1e-13, max_iter: int = 50, device: str = "cpu") -> Exact:
    """Newton in float64 (analytic gradient and Hessian) to ‖∇_w g‖ ≤ tol, then
    ``∇F = −e^λ ⊙ w ⊙ H⁻¹ ∇_w f`` with a Cholesky solve (∂_{λ_j} ∇_w g = e^{λ_j} w_j e_j)."""
    t0 = time.perf_counter()
    X, y, Xv, yv, lam = (torch.as_tensor(a, dtype=torch.float64, device=device) for a in _arrays(data))
    n, reg = X.shape[0], lam.exp()

    def loss(w: torch.Tensor) -> torch.Tensor:
        return F.softplus(-y * (X @ w)).mean() + 0.5 * (reg * w * w).sum()

    def grad_hess(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.sigmoid(-y * (X @ w))
        g = -(X.T @ (y * p)) / n + reg * w
        H = (X.T * (p * (1 - p))) @ X / n + torch.diag(reg)
        return g, H

    w = torch.zeros(X.shape[1], dtype=torch.float64, device=device)
    iterations, best = 0, math.inf
    for _ in range(max_iter):
        g, H = grad_hess(w)
        gnorm = g.norm().item()
        if gnorm <= tol or gnorm >= best:  # converged, or at the rounding floor
            break
        best, iterations = gnorm, iterations + 1
        dw = torch.cholesky_solve(g[:, None], torch.linalg.cholesky(H))[:, 0]
        t, f0 = 1.0, loss(w)
        while loss(w - t * dw) > f0 + 1e-12 * abs(f0) and t > 1e-8:  # damped far from w*
            t /= 2
        w = w - t * dw
    g, H = grad_hess(w)
    gf = -(Xv.T @ (yv * torch.sigmoid(-yv * (Xv @ w)))) / Xv.shape[0]
    v = torch.cholesky_solve(gf[:, None], torch.linalg.cholesky(H))[:, 0]
    return Exact((-reg * w * v).cpu(), w.cpu(), iterations, g.norm().item(), time.perf_counter() - t0)


def _arrays(data: Data) -> tuple[np.ndarray, ...]:
    return data.X, data.y, data.Xv, data.yv, data.lam


@dataclass(frozen=True)
class TorchProblem:
    """The problem as torch tensors of one dtype, and its functions of ``(w, λ)``."""

    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    lam: torch.Tensor
    eta: float

    def inner_loss(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return F.softplus(-self.y * (self.X @ w)).mean() + 0.5 * (lam.exp() * w * w).sum()

    def inner_grad(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """∇_w g, written out (two passes over X); differentiable in w and λ."""
        r = -self.y * torch.sigmoid(-self.y * (self.X @ w))
        return self.X.T @ r / self.X.shape[0] + lam.exp() * w

    def step(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """One GD step, the fixed-point map Φ(w, λ) = w − η ∇_w g(w, λ)."""
        return w - self.eta * self.inner_grad(w, lam)

    def outer_loss(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return F.softplus(-self.yv * (self.Xv @ w)).mean()


def torch_problem(data: Data, dtype: torch.dtype, eta: float, device: str = "cpu") -> TorchProblem:
    X, y, Xv, yv, lam = (torch.as_tensor(a, dtype=dtype, device=device).contiguous() for a in _arrays(data))
    return TorchProblem(X, y, Xv, yv, lam, eta)


def gd(prob: TorchProblem, w0: torch.Tensor, lam: torch.Tensor, steps: int) -> torch.Tensor:
    """The inner solver every torch method shares: ``steps`` GD steps, no graph."""
    w = w0
    with torch.no_grad():
        for _ in range(steps):
            w = prob.step(w, lam)
    return w


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One way to get the hypergradient, as calls to time.

    ``pipeline(None)``: T inner steps from zero + the hypergradient.  ``hypergrad(state)``
    with ``state = setup()`` (untimed): the hypergradient alone at the shared w_T.
    """

    name: str
    library: str
    pipeline: Callable[[Any], Any]
    hypergrad: Callable[[Any], Any]
    setup: Callable[[], Any] | None = None
    block: Callable[[Any], Any] = _sync
    note: str = ""


def ours(prob: TorchProblem, T: int, K: int, w_T: torch.Tensor) -> list[Method]:
    """bilevel's AID-FP, AID-CG, Neumann (tol=0: exactly K iterations) and ITD."""
    zeros = torch.zeros_like(prob.lam)

    def aid(name: str, solver: bilevel.linear_solve.Solver, **form: Any) -> Method:
        def hg(w: torch.Tensor) -> torch.Tensor:
            return bilevel.hypergrad(prob.outer_loss, w, prob.lam, solver=solver, **form)

        return Method(name, "bilevel", lambda _: hg(gd(prob, zeros, prob.lam, T)), lambda _: hg(w_T))

    def itd_forward() -> tuple[torch.Tensor, torch.Tensor]:
        lam = prob.lam.detach().requires_grad_()
        return lam, bilevel.unroll(prob.step, zeros, lam, T)

    def itd_backward(state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        lam, w = state
        return torch.autograd.grad(prob.outer_loss(w, lam), lam)[0]

    return [
        aid("AID-FP", bilevel.FixedPoint(maxiter=K, tol=0.0), fixed_point=prob.step),
        aid("AID-CG", bilevel.CG(maxiter=K, tol=0.0), inner_loss=prob.inner_loss),
        aid("Neumann", bilevel.Neumann(maxiter=K, tol=0.0), fixed_point=prob.step),
        Method(
            "ITD", "bilevel", lambda _: itd_backward(itd_forward()), itd_backward, itd_forward,
            note="hypergradient alone = the backward pass through the T recorded steps",
        ),
    ]


def inner_solver_method(prob: TorchProblem, T: int, K: int, solver: str) -> Method:
    """Ours with its own inner solver, ``bilevel.newton_cg`` or ``bilevel.lbfgs`` (T steps,
    tol=0), then AID-CG (K steps, tol=0; "lbfgs-pcg": preconditioned by the L-BFGS inverse
    Hessian).  ``T`` counts Newton / L-BFGS steps, not GD steps."""
    zeros = torch.zeros_like(prob.lam)
    minimize = bilevel.newton_cg if solver == "newton" else bilevel.lbfgs

    def pipeline(_: Any) -> torch.Tensor:
        w, info = minimize(prob.inner_loss, zeros, prob.lam, maxiter=T, tol=0.0)
        precond = info.inverse_hessian if solver == "lbfgs-pcg" else None
        return bilevel.hypergrad(prob.outer_loss, w, prob.lam, inner_loss=prob.inner_loss,
                                 solver=bilevel.CG(maxiter=K, tol=0.0), precond=precond)

    name = {"newton": "Newton-CG + AID-CG", "lbfgs": "LBFGS + AID-CG", "lbfgs-pcg": "LBFGS + AID-PCG"}[solver]
    return Method(name, "bilevel", pipeline, lambda _: None, note="T = Newton / L-BFGS steps")


def hypergrad_work(prob: TorchProblem, K: int, w_T: torch.Tensor, repeats: int, warmup: int) -> Timing:
    """The evaluations any AID-CG hypergradient must make, by plain autograd and nothing
    else: ∇_w g with its graph, K Hessian–vector products through it, ∇ of the outer loss.
    The overhead ratio is (our hypergradient step) / (this)."""
    g0 = torch.Generator(device=w_T.device).manual_seed(0)
    vs = [torch.randn(w_T.shape, generator=g0, dtype=w_T.dtype, device=w_T.device) for _ in range(K)]

    def work(_: Any) -> torch.Tensor:
        w = w_T.detach().requires_grad_()
        lam = prob.lam.detach().requires_grad_()
        gw = torch.autograd.grad(prob.inner_loss(w, lam), w, create_graph=True)[0]
        gf = torch.autograd.grad(prob.outer_loss(w, lam), w)[0]
        out = gf
        for v in vs:
            out = out + torch.autograd.grad(gw, w, v, retain_graph=True)[0]
        return out + torch.autograd.grad(gw, lam, gf)[0]

    timing, _ = time_call(work, repeats=repeats, warmup=warmup, block=_sync)
    return timing


def by_hand(prob: TorchProblem, T: int, K: int, w_T: torch.Tensor) -> Method:
    """The floor: analytic GD steps, then CG with analytic Hessian–vector products
    ``Hv = Xᵀ(s ⊙ Xv)/n + e^λ ⊙ v`` and two gradients; no autograd, no checks."""
    X, y, Xv, yv, reg = prob.X, prob.y, prob.Xv, prob.yv, prob.lam.exp()
    n, zeros = X.shape[0], torch.zeros_like(prob.lam)

    def hg(w: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(-y * (X @ w))
        s = p * (1 - p)
        b = -(Xv.T @ (yv * torch.sigmoid(-yv * (Xv @ w)))) / Xv.shape[0]
        x, r = torch.zeros_like(b), b.clone()
        d, rs = r.clone(), r @ r
        for _ in range(K):
            Ad = X.T @ (s * (X @ d)) / n + reg * d
            alpha = _safe_div(rs, d @ Ad)
            x, r = x + alpha * d, r - alpha * Ad
            rs_new = r @ r
            d, rs = r + _safe_div(rs_new, rs) * d, rs_new
        return -reg * w * x

    return Method(
        "analytic CG", "reference", lambda _: hg(gd(prob, zeros, prob.lam, T)), lambda _: hg(w_T),
        note="reference floor: T analytic GD steps + K analytic HVPs + 2 gradients",
    )


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def torchopt_method(prob: TorchProblem, T: int, K: int, w_T: torch.Tensor) -> Method:
    """TorchOpt: ``custom_root(∇_w g, argnums=1, solve=solve_cg(maxiter=K, rtol=0))``
    around the same GD loop; the hypergradient by ``torch.autograd.grad``."""
    import torchopt
    from torchopt.diff.implicit import custom_root

    solve = torchopt.linear_solve.solve_cg(maxiter=K, rtol=0.0, atol=0.0)

    def optimality(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return prob.inner_grad(w, lam)

    def solver(steps: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        @custom_root(optimality, argnums=1, solve=solve)
        def inner_solve(w0: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            return gd(prob, w0, lam, steps).clone()

        return inner_solve

    solve_T, solve_0 = solver(T), solver(0)

    def hg(inner_solve: Callable, w0: torch.Tensor) -> torch.Tensor:
        lam = prob.lam.detach().requires_grad_()
        return torch.autograd.grad(prob.outer_loss(inner_solve(w0, lam), lam), lam)[0]

    zeros = torch.zeros_like(prob.lam)
    return Method(
        "TorchOpt CG", f"torchopt {torchopt.__version__}",
        lambda _: hg(solve_T, zeros), lambda _: hg(solve_0, w_T),
        note="hypergradient alone = custom_root around a 0-step solver started at w_T",
    )


def torchopt_lbfgs_method(prob: TorchProblem, T: int, K: int) -> Method:
    """TorchOpt with the best inner solver a torch user has: ``torch.optim.LBFGS`` (T
    iterations, strong Wolfe line search, tolerances 0) inside ``custom_root`` + CG (K)."""
    import torchopt
    from torchopt.diff.implicit import custom_root

    solve = torchopt.linear_solve.solve_cg(maxiter=K, rtol=0.0, atol=0.0)

    @custom_root(lambda w, lam: prob.inner_grad(w, lam), argnums=1, solve=solve)
    def inner_solve(w0: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        w = w0.detach().clone().requires_grad_()
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=T, tolerance_grad=0.0, tolerance_change=0.0,
                                history_size=10, line_search_fn="strong_wolfe")
        lam_c = lam.detach()

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = prob.inner_loss(w, lam_c)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return w.detach()

    def pipeline(_: Any) -> torch.Tensor:
        lam = prob.lam.detach().requires_grad_()
        w = inner_solve(torch.zeros_like(lam), lam)
        return torch.autograd.grad(prob.outer_loss(w, lam), lam)[0]

    return Method("TorchOpt LBFGS+CG", f"torchopt {torchopt.__version__}", pipeline, lambda _: None,
                  note="T = torch.optim.LBFGS iterations")


def jax_problem(data: Data, dtype: torch.dtype) -> SimpleNamespace:
    """Import JAX (float64 enabled) and build the problem's arrays and functions."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import jaxopt

    jdtype = jnp.float64 if dtype == torch.float64 else jnp.float32

    def inner_loss(w, lam, X, y):
        return jnp.mean(jax.nn.softplus(-y * (X @ w))) + 0.5 * jnp.sum(jnp.exp(lam) * w * w)

    def inner_grad(w, lam, X, y):
        # r @ X, not X.T @ r: with X an argument of the jitted function, XLA copies the
        # transpose of X in every fori_loop iteration (3.4 s vs 1.35 s for 200 steps here)
        r = -y * jax.nn.sigmoid(-y * (X @ w))
        return r @ X / X.shape[0] + jnp.exp(lam) * w

    def outer_loss(w, Xv, yv):
        return jnp.mean(jax.nn.softplus(-yv * (Xv @ w)))

    version = getattr(jaxopt, "__version__", None) or _dist_version("jaxopt")
    return SimpleNamespace(
        jax=jax, jnp=jnp, jaxopt=jaxopt, dtype=jdtype,
        arrays=tuple(jnp.asarray(a, dtype=jdtype) for a in _arrays(data)),
        inner_loss=inner_loss, inner_grad=inner_grad, outer_loss=outer_loss,
        library=f"jaxopt {version} / jax {jax.__version__}",
    )


def jaxopt_method(jp: SimpleNamespace, T: int, K: int, eta: float, w_T: torch.Tensor) -> Method:
    """JAXopt: ``implicit_diff.custom_root(∇_w g, solve=solve_cg(maxiter=K, tol=0))`` around
    a ``lax.fori_loop`` GD loop, ``jax.grad`` of the whole, under ``jax.jit``."""
    jax, jnp = jp.jax, jp.jnp
    from jaxopt import implicit_diff, linear_solve

    solve = partial(linear_solve.solve_cg, maxiter=K, tol=0.0)

    def solver(steps: int) -> Callable:
        @implicit_diff.custom_root(jp.inner_grad, solve=solve)
        def inner_solve(w0, lam, X, y):
            step = lambda _, w: w - eta * jp.inner_grad(w, lam, X, y)  # noqa: E731
            return jax.lax.fori_loop(0, steps, step, w0)

        return inner_solve

    solve_T, solve_0 = solver(T), solver(0)

    @jax.jit
    def pipeline(lam, X, y, Xv, yv):
        return jax.grad(lambda lm: jp.outer_loss(solve_T(jnp.zeros_like(lm), lm, X, y), Xv, yv))(lam)

    @jax.jit
    def hypergrad(w, lam, X, y, Xv, yv):
        return jax.grad(lambda lm: jp.outer_loss(solve_0(w, lm, X, y), Xv, yv))(lam)

    X, y, Xv, yv, lam = jp.arrays
    w_j = jnp.asarray(w_T.numpy(), dtype=jp.dtype)
    return Method(
        "JAXopt CG (jit)", jp.library,
        lambda _: pipeline(lam, X, y, Xv, yv), lambda _: hypergrad(w_j, lam, X, y, Xv, yv),
        block=jax.block_until_ready,
        note="hypergradient alone = custom_root around a 0-step solver started at w_T; "
        "first_call_ms includes compilation",
    )


def jaxopt_lbfgs_method(jp: SimpleNamespace, T: int, K: int) -> Method:
    """JAXopt's own inner solver: ``jaxopt.LBFGS`` (T iterations, tol=0) with its built-in
    implicit differentiation by CG (K steps, tol=0), ``jax.grad`` under ``jax.jit``."""
    jax, jnp = jp.jax, jp.jnp
    from jaxopt import linear_solve

    lbfgs = jp.jaxopt.LBFGS(
        fun=jp.inner_loss, maxiter=T, tol=0.0, implicit_diff=True,
        implicit_diff_solve=partial(linear_solve.solve_cg, maxiter=K, tol=0.0),
    )

    @jax.jit
    def pipeline(lam, X, y, Xv, yv):
        return jax.grad(lambda lm: jp.outer_loss(lbfgs.run(jnp.zeros_like(lm), lm, X, y).params, Xv, yv))(lam)

    X, y, Xv, yv, lam = jp.arrays
    return Method(
        "JAXopt LBFGS+CG (jit)", jp.library, lambda _: pipeline(lam, X, y, Xv, yv), lambda _: None,
        block=jax.block_until_ready, note="T = L-BFGS iterations",
    )


def peer_methods(
    peers: tuple[str, ...], data: Data, prob: TorchProblem, dtype: torch.dtype, T: int, K: int,
    w_T: torch.Tensor, notes: list[str],
) -> list[Method]:
    """The peers that import; a note for each one skipped."""
    out = []
    for peer in peers:
        try:
            if peer == "TorchOpt":
                out.append(torchopt_method(prob, T, K, w_T))
            elif prob.X.device.type != "cpu":
                raise _NotOnDevice("this benchmark runs JAXopt on the CPU only; no side-by-side on a GPU")
            else:
                out.append(jaxopt_method(jax_problem(data, dtype), T, K, prob.eta, w_T))
        except (ImportError, _NotOnDevice) as err:
            why = str(err) if isinstance(err, _NotOnDevice) else f"it does not import ({err})"
            note = f"{peer} skipped: {why}."
            if note not in notes:
                notes.append(note)
    return out


class _NotOnDevice(Exception):
    """A peer that cannot run on the device asked for."""


def to_float64(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.array(out), dtype=torch.float64)


def rel_err(a: torch.Tensor, exact: torch.Tensor) -> float:
    return ((a - exact).norm() / exact.norm()).item()


# --------------------------------------------------------------------------- runs


@dataclass
class Row:
    method: Method
    pipeline: Timing
    hypergrad: Timing
    rel_err: float
    rel_err_hypergrad_only: float
    error: str | None = None  # why the method failed, if it did

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.name,
            "library": self.method.library,
            "error": self.error,
            "pipeline": self.pipeline.as_dict(),
            "hypergrad_only": self.hypergrad.as_dict(),
            "rel_err": self.rel_err,
            "rel_err_hypergrad_only": self.rel_err_hypergrad_only,
            "note": self.method.note,
        }


@dataclass
class SizeResult:
    n: int
    d: int
    exact: Exact
    inner_rel_err: float
    rows: list[Row] = field(default_factory=list)
    tta: list[dict[str, Any]] = field(default_factory=list)
    work: Timing | None = None  # K autograd HVPs + the gradients: what AID-CG must evaluate

    def overhead(self) -> float | None:
        """Our AID-CG hypergradient step / the autograd evaluations it must make."""
        mine = self.row(OURS_REFERENCE)
        if mine is None or self.work is None:
            return None
        return mine.hypergrad.median / self.work.median

    def row(self, name: str) -> Row | None:
        """The row of a method by its first word (``"TorchOpt"``, ``"AID-CG"``), if it ran."""
        return next((r for r in self.rows if r.method.name.split()[0] == name and r.error is None), None)

    def ratios(self) -> dict[str, dict[str, float]]:
        """ours / peer median times, for every one of our methods and every peer present."""
        out: dict[str, dict[str, float]] = {}
        for mine in (r for r in self.rows if r.method.library == "bilevel" and r.error is None):
            for peer in PEERS:
                theirs = self.row(peer)
                if theirs is not None:
                    out[f"{mine.method.name} / {peer}"] = {
                        "pipeline": mine.pipeline.median / theirs.pipeline.median,
                        "hypergrad_only": mine.hypergrad.median / theirs.hypergrad.median,
                    }
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "d": self.d,
            "n_validation": max(self.n // 2, 2),
            "exact": {
                "newton_iterations": self.exact.newton_iterations,
                "grad_norm": self.exact.grad_norm,
                "seconds": self.exact.seconds,
            },
            "inner_rel_err": self.inner_rel_err,
            "methods": [r.as_dict() for r in self.rows],
            "ratios": self.ratios(),
            "hypergrad_work": None if self.work is None else self.work.as_dict(),
            "overhead_ratio": self.overhead(),
            "time_to_accuracy": self.tta,
        }


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_size(n: int, d: int, args: argparse.Namespace, notes: list[str]) -> SizeResult:
    dtype = getattr(torch, args.dtype)
    data = make_data(n, d, args.seed)
    _log(f"[{n}x{d}] exact hypergradient (Newton, float64) ...")
    exact = exact_hypergrad(data, device=args.device)
    prob = torch_problem(data, dtype, args.step, args.device)
    w_T = gd(prob, torch.zeros_like(prob.lam), prob.lam, args.T)
    result = SizeResult(n, d, exact, rel_err(to_float64(w_T), exact.params))
    methods = ours(prob, args.T, args.K, w_T) + [by_hand(prob, args.T, args.K, w_T)]
    if not args.skip_peers:
        methods += peer_methods(PEERS, data, prob, dtype, args.T, args.K, w_T, notes)
    for m in methods:
        _log(f"[{n}x{d}] {m.name} ...")
        try:
            pipe, out = time_call(m.pipeline, repeats=args.repeats, warmup=args.warmup, block=m.block)
            hg, out_hg = time_call(
                m.hypergrad, repeats=args.repeats, warmup=args.warmup, setup=m.setup, block=m.block
            )
        except Exception as err:  # a failing method is a result to report, not a reason to stop
            result.rows.append(Row(m, Timing(), Timing(), math.nan, math.nan, f"{type(err).__name__}: {err}"))
            notes.append(f"{n}x{d} {m.name} failed: {type(err).__name__}: {err}")
            continue
        row = Row(m, pipe, hg, rel_err(to_float64(out), exact.hypergrad),
                  rel_err(to_float64(out_hg), exact.hypergrad))
        if not math.isfinite(row.rel_err):
            notes.append(f"{n}x{d} {m.name} returned a non-finite hypergradient.")
        result.rows.append(row)
    _log(f"[{n}x{d}] the evaluations AID-CG must make (K autograd HVPs + gradients) ...")
    result.work = hypergrad_work(prob, args.K, w_T, args.repeats, args.warmup)
    if args.tta is not None:
        result.tta = time_to_accuracy(data, prob, exact, args, notes)
    return result


# --------------------------------------------------------------------------- time to accuracy


@dataclass(frozen=True)
class Candidate:
    """A method whose cost is set by (T, K): ``build(T, K)`` and the schedules to search."""

    name: str
    build: Callable[[int, int], Method]
    Ts: list[int]
    Ks: list[int] | None  # None: K plays no part (ITD)


def tta_candidates(data: Data, prob: TorchProblem, args: argparse.Namespace, notes: list[str]) -> list[Candidate]:
    """Ours (GD inner, every hypergradient method), TorchOpt (GD + CG), JAXopt (GD + CG,
    and its own L-BFGS + CG).  CG-type K stop at d: past exact convergence the peers' CG
    divides by a zero curvature, and more steps cannot help."""
    d = prob.lam.numel()
    Ts = [args.T * 2**i for i in range(args.tta_doublings + 1)]
    Ks = [5 * 2**i for i in range(args.tta_doublings + 4)]
    Kcg = sorted({min(k, d) for k in Ks})
    w_T = torch.zeros_like(prob.lam)  # the pipelines do not use it

    def mine(name: str) -> Callable[[int, int], Method]:
        return lambda T, K: next(m for m in ours(prob, T, K, w_T) if m.name == name)

    cands = [
        Candidate("AID-FP", mine("AID-FP"), Ts, Ks),
        Candidate("AID-CG", mine("AID-CG"), Ts, Kcg),
        Candidate("Neumann", mine("Neumann"), Ts, Ks),
        Candidate("ITD", mine("ITD"), Ts, None),
        Candidate("Newton-CG + AID-CG", lambda T, K: inner_solver_method(prob, T, K, "newton"),
                  [2**i for i in range(7)], Kcg),
        Candidate("LBFGS + AID-CG", lambda T, K: inner_solver_method(prob, T, K, "lbfgs"),
                  [10 * 2**i for i in range(args.tta_doublings + 2)], Kcg),
        Candidate("LBFGS + AID-PCG", lambda T, K: inner_solver_method(prob, T, K, "lbfgs-pcg"),
                  [10 * 2**i for i in range(args.tta_doublings + 2)], Kcg),
    ]
    if args.skip_peers:
        return cands
    try:
        import torchopt  # noqa: F401

        cands.append(Candidate("TorchOpt CG", lambda T, K: torchopt_method(prob, T, K, w_T), Ts, Kcg))
        cands.append(Candidate("TorchOpt LBFGS+CG", lambda T, K: torchopt_lbfgs_method(prob, T, K),
                               [10 * 2**i for i in range(args.tta_doublings + 2)], Kcg))
    except ImportError:
        pass  # noted by the main table
    if prob.X.device.type != "cpu":
        return cands
    try:
        jp = jax_problem(data, getattr(torch, args.dtype))
    except ImportError:
        return cands
    Tl = [10 * 2**i for i in range(args.tta_doublings + 2)]
    cands += [
        Candidate("JAXopt CG (jit)", lambda T, K: jaxopt_method(jp, T, K, prob.eta, w_T), Ts, Kcg),
        Candidate("JAXopt LBFGS+CG (jit)", lambda T, K: jaxopt_lbfgs_method(jp, T, K), Tl, Kcg),
    ]
    return cands


def time_to_accuracy(
    data: Data, prob: TorchProblem, exact: Exact, args: argparse.Namespace, notes: list[str]
) -> list[dict[str, Any]]:
    """For each candidate: the smallest T of its schedule reaching rel. err ≤ --tta with K
    at its largest, then the smallest K reaching it with that T; the median time of that
    (T, K).  A method that fails or never reaches the target is reported as such."""
    target, tag = args.tta, f"[{data.X.shape[0]}x{prob.lam.numel()}]"
    out = []
    for c in tta_candidates(data, prob, args, notes):
        if args.tta_methods and not any(c.name.startswith(m) for m in args.tta_methods):
            continue
        _log(f"{tag} time to rel. err <= {target:g}: {c.name} ...")

        def error(T: int, K: int, c: Candidate = c) -> float:
            m = c.build(T, K)
            return rel_err(to_float64(m.block(m.pipeline(None))), exact.hypergrad)

        k_max = c.Ks[-1] if c.Ks else 0
        try:
            T = next((T for T in c.Ts if error(T, k_max) <= target), None)
            if T is None:
                out.append({"method": c.name, "reached": False, "T_max": c.Ts[-1], "K_max": k_max})
                continue
            K = next(K for K in c.Ks if error(T, K) <= target) if c.Ks else 0
            m = c.build(T, K)
            timing, res = time_call(m.pipeline, repeats=args.repeats, warmup=args.warmup, block=m.block)
        except Exception as err:
            out.append({"method": c.name, "reached": False, "error": f"{type(err).__name__}: {err}"})
            notes.append(f"time to accuracy, {c.name} failed: {type(err).__name__}: {err}")
            continue
        out.append({
            "method": c.name, "library": m.library, "reached": True, "T": T,
            "K": K if c.Ks else None, "rel_err": rel_err(to_float64(res), exact.hypergrad),
            **timing.as_dict(),
        })
    return out


# --------------------------------------------------------------------------- report


def _ms(t: Timing) -> float:
    return 1e3 * t.median


def _ratio(a: Timing, b: Timing | None) -> str | None:
    return None if b is None else f"{a.median / b.median:.2f}x"


def table(res: SizeResult, args: argparse.Namespace) -> str:
    head = (
        f"n={res.n} d={res.d}  T={args.T} GD steps (η={args.step})  K={args.K}  {args.dtype}  {args.device}  "
        f"threads={args.threads}  median of {args.repeats}\n"
        f"exact: Newton {res.exact.newton_iterations} it., ‖∇g‖={res.exact.grad_norm:.1e};  "
        f"inner rel. err of w_T: {res.inner_rel_err:.2e} (part of every error below)\n"
    )
    peers = {p: res.row(p) for p in PEERS}
    headers = ["method", "library", "pipeline ms", "hypergrad ms", "rel. err"]
    for p, r in peers.items():
        if r is not None:
            headers += [f"pipe÷{p}", f"hg÷{p}"]
    rows = []
    for r in res.rows:
        if r.error is not None:
            rows.append([r.method.name, r.method.library.split()[0], "failed", "failed", "-"])
            continue
        row = [r.method.name, r.method.library.split()[0], _ms(r.pipeline), _ms(r.hypergrad),
               f"{r.rel_err:.2e}"]
        for theirs in peers.values():
            if theirs is not None:
                row += [_ratio(r.pipeline, theirs.pipeline), _ratio(r.hypergrad, theirs.hypergrad)]
        rows.append(row)
    text = head + format_table(headers, rows)
    if res.work is not None:
        ratio = res.overhead()
        text += (
            f"\nthe evaluations {OURS_REFERENCE} must make (∇g with graph, K={args.K} autograd HVPs, ∇f, one "
            f"mixed vjp): {_ms(res.work):.4g} ms;  overhead ratio {OURS_REFERENCE} hypergrad / that: "
            + ("-" if ratio is None else f"{ratio:.2f}x")
        )
    mine = res.row(OURS_REFERENCE)
    for p, theirs in peers.items():
        if mine is not None and theirs is not None:
            text += (
                f"\nours {OURS_REFERENCE} / {p}: pipeline {mine.pipeline.median / theirs.pipeline.median:.2f}x,"
                f" hypergradient alone {mine.hypergrad.median / theirs.hypergrad.median:.2f}x"
            )
    return text


def tta_table(res: SizeResult, target: float) -> str:
    rows = []
    for e in res.tta:
        if e["reached"]:
            rows.append([e["method"], e["library"].split()[0], e["T"], e["K"], e["median_ms"],
                         f"{e['rel_err']:.2e}"])
        elif "error" in e:
            rows.append([e["method"], "-", "-", "-", "failed", "-"])
        else:
            rows.append([e["method"], "-", f">{e['T_max']}", "-", "not reached", "-"])
    head = (
        f"n={res.n} d={res.d}: time to rel. err <= {target:g}, smallest T then K of a doubling "
        "schedule (inner: GD, or L-BFGS where named)\n"
    )
    return head + format_table(["method", "library", "T", "K", "ms", "rel. err"], rows)


# --------------------------------------------------------------------------- CLI


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        try:
            n, d = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"sizes should look like 2000x200,10000x1000, not {text!r}") from None
        if n < 4 or d < 1:
            raise argparse.ArgumentTypeError(f"size {part!r}: need n >= 4 and d >= 1")
        sizes.append((n, d))
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help="comma-separated NxD (default 2000x200,10000x1000; --quick: 1000x100)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 5; --quick: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and XLA (default: all cores)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the torch methods run (cuda: default size 1000000x1000; skipped cleanly "
                   "when no GPU is available)")
    p.add_argument("--T", type=int, default=200, help="inner GD steps (default 200)")
    p.add_argument("--K", type=int, default=30, help="linear-solver steps (default 30)")
    p.add_argument("--step", type=float, default=0.5, help="GD step size η (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-peers", action="store_true", help="time bilevel only")
    p.add_argument("--quick", action="store_true", help="one small size, 3 repeats")
    p.add_argument("--tta", type=float, default=None, metavar="TARGET",
                   help="also report time to rel. err <= TARGET (e.g. 1e-6)")
    p.add_argument("--tta-doublings", type=int, default=5, help="T doubles at most this many times (default 5)")
    p.add_argument("--tta-methods", type=lambda t: [m.strip() for m in t.split(",") if m.strip()], default=None,
                   help="comma-separated name prefixes of the methods in the time-to-accuracy table "
                   "(default all), e.g. 'AID-CG,LBFGS,TorchOpt,JAXopt'")
    p.add_argument("--out", default="benchmarks/results/logreg.json", help="JSON output path")
    args = p.parse_args(argv)
    if args.sizes is None:
        if args.quick:
            args.sizes = [(1000, 100)]
        else:
            args.sizes = [(1_000_000, 1000)] if args.device == "cuda" else [(2000, 200), (10000, 1000)]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    for name in ("repeats", "T", "K"):
        if getattr(args, name) < 1:
            p.error(f"--{name} should be >= 1")
    if args.warmup < 0 or args.tta_doublings < 0:
        p.error("--warmup and --tta-doublings should be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU here (torch.cuda.is_available() is False); nothing to run, skipped.")
        return 0
    # TorchOpt 0.7 calls the deprecated functorch.vjp: one FutureWarning, not ours to fix.
    warnings.filterwarnings("ignore", message=r".*functorch\.vjp.*", category=FutureWarning)
    threads = configure_threads(args.threads)  # before anything imports jax
    args.threads = threads["threads"]
    notes: list[str] = list(threads["notes"])
    if args.repeats < 5:
        notes.append(f"median of {args.repeats} runs (< 5): a quick look, not a measurement.")
    results = [run_size(n, d, args, notes) for n, d in args.sizes]
    print()
    for res in results:
        print(table(res, args) + "\n")
        if res.tta:
            print(tta_table(res, args.tta) + "\n")
    for note in notes:
        print(f"note: {note}")
    payload = {
        "benchmark": "logreg",
        "config": {
            "sizes": [list(s) for s in args.sizes], "T": args.T, "K": args.K, "step": args.step,
            "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
            "threads": args.threads, "peers": not args.skip_peers, "tta_target": args.tta,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        },
        "machine": machine_info(threads),
        "notes": notes,
        "results": [r.as_dict() for r in results],
    }
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

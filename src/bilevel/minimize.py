"""Fast inner solvers over pytrees for ``min_w g(w, λ)``: truncated Newton–CG and L-BFGS.

Newton–CG:

Each iteration solves ``H d = ∇_w g`` inexactly by CG (Hessian–vector products from one
vjp closure of ``∇_w g``, as in the hypergradient itself) with the forcing tolerance
``min(0.5, √‖∇g‖)`` (superlinear local convergence, Dembo & Steihaug 1983), then takes
``w ← w − t d`` with an Armijo backtracking line search.  When CG meets negative curvature
the step falls back to the gradient direction.  It reaches machine-precision inner
solutions in a few dozen Hessian–vector products on smooth strongly convex problems,
which is what an exact hypergradient needs.

L-BFGS (Nocedal 1980; Nocedal & Wright, Alg. 7.4): the two-loop recursion over the last
``history`` pairs ``(s, y)``, initial scaling ``γ = sᵀy / yᵀy``, Armijo backtracking; a pair
is kept only when ``sᵀy > 0``.  One gradient per iteration (no Hessian–vector products),
so on data-bound problems (one pass over the data per gradient) it is the cheaper of the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad_and_value, vjp

from bilevel import _tree as T
from bilevel._checks import (
    SolverError,
    check_autograd,
    check_count,
    check_input_finite,
    check_tol,
    eager,
    item,
    leaves,
    scalar,
    warn_unconverged,
)
from bilevel.ift import (
    _fresh_leaves,
    _grads,
    _plain_autograd,
    _tree_fn,
)
from bilevel.linear_solve import CG, _host_scalars, solve_leaves

Leaves = list[torch.Tensor]

__all__ = ["newton_cg", "lbfgs", "MinimizeInfo"]


def _report(where: str, name: str, info: MinimizeInfo, scale: float, tol: float, fix: str) -> None:
    """The one ConvergenceWarning (through :mod:`bilevel._checks`) for a minimisation that
    stopped with ``‖∇g‖ > tol·max(1, ‖∇g(params0)‖)``; ``tol = 0`` asks for exactly
    ``maxiter`` steps: no warning."""
    if tol > 0 and not info.converged:
        warn_unconverged(where, name, info.iterations, info.grad_norm / scale, tol,
                         f"(The residual is ‖∇_w inner_loss‖ / max(1, ‖∇_w inner_loss(params0)‖).) {fix}")


@dataclass(frozen=True)
class MinimizeInfo:
    """``iterations`` (Newton or L-BFGS steps), ``hvps`` (Hessian–vector products in CG; 0 for
    L-BFGS), ``grad_norm`` = ‖∇_w g‖ at the returned params, ``converged``, ``loss``,
    ``evaluations`` (gradient evaluations, line search included).  ``inverse_hessian``
    (L-BFGS only): ``v ↦ H_k v``, the SPD L-BFGS approximation of ``(∇²_w g)⁻¹`` from the
    last pairs, on pytrees shaped like params — a preconditioner for the hypergradient's
    CG: ``hypergrad(..., solver=CG(), precond=info.inverse_hessian)``."""

    iterations: int
    hvps: int
    grad_norm: float
    converged: bool
    loss: float
    evaluations: int = 0
    inverse_hessian: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)


def _inner_problem(
    inner_loss: Callable[[Any, Any], torch.Tensor], params0: Any, hparams: Any, maxiter: int, tol: float
) -> tuple[Leaves, Any, Leaves, Callable[[Leaves], torch.Tensor]]:
    """Checked options, detached leaves of params0 and hparams, and ``w ↦ g(w, λ)`` on leaves."""
    check_autograd("the inner solver")
    check_count("maxiter", maxiter)
    check_tol("tol", tol)  # never a bool or inf: tol=True would return params0 as 'converged'
    w, wspec = leaves(params0, "params0")
    lam, lspec = leaves(hparams, "hparams")
    w = [t.detach() for t in w]
    lam = [t.detach() for t in lam]
    check_input_finite(w, "params0")
    g = _tree_fn(inner_loss, wspec, lspec)

    def loss(wl: Leaves) -> torch.Tensor:
        return scalar(g(wl, lam), "inner_loss")

    return w, wspec, lam, loss


def _gradient_and_hvp(
    loss: Callable[[Leaves], torch.Tensor], w: Leaves, plain: bool
) -> tuple[torch.Tensor, Leaves, Callable[[Leaves], Leaves]]:
    """``(g(w), ∇g(w), v ↦ ∇²g(w) v)``: every Hessian–vector product goes through one graph
    of ∇g built here (plain autograd outside torch.func transforms, a vjp closure under them)."""
    if plain:
        with torch.enable_grad():
            wr = _fresh_leaves(w)
            fval = loss(wr)
            gw = _grads(fval, wr, create_graph=True)
        return fval.detach(), [t.detach() for t in gw], lambda v: _grads(gw, wr, v)
    gw, hvp, fval = vjp(grad_and_value(loss), w, has_aux=True)
    return fval, list(gw), lambda v: list(hvp(v)[0])


@eager  # under torch.compile: runs eagerly (a graph break), never mis-traced
def newton_cg(
    inner_loss: Callable[[Any, Any], torch.Tensor],
    params0: Any,
    hparams: Any,
    *,
    maxiter: int = 50,
    tol: float = 1e-10,
    cg_maxiter: int = 100,
) -> tuple[Any, MinimizeInfo]:
    """Minimise ``inner_loss(params, hparams)`` over ``params`` from ``params0``.

    Stops when ``‖∇_w g‖ ≤ tol·max(1, ‖∇_w g(params0)‖)`` or after ``maxiter`` Newton
    steps.  Returns ``(params, MinimizeInfo)``; ``params`` is detached and shaped like
    ``params0``.  ``g`` should be twice differentiable; it need not be convex (negative
    curvature falls back to a gradient step).
    """
    check_count("cg_maxiter", cg_maxiter, 1)
    w, wspec, lam, loss = _inner_problem(inner_loss, params0, hparams, maxiter, tol)
    hvps, k = 0, 0
    gnorm0 = None
    converged = False
    plain = _plain_autograd(w, lam)
    for k in range(maxiter + 1):
        fval, gw, hvp = _gradient_and_hvp(loss, w, plain)
        gnorm = item(T.norm(gw))
        if gnorm0 is None:
            gnorm0 = max(1.0, gnorm)
        if not gnorm == gnorm or gnorm == float("inf"):
            raise SolverError("newton_cg: NaN/Inf gradient; check inner_loss and params0.")
        if gnorm <= tol * gnorm0:
            converged = True
            break
        if k == maxiter:
            break
        try:
            forcing = CG(maxiter=cg_maxiter, tol=min(0.5, gnorm**0.5))
            d, info = solve_leaves(hvp, gw, forcing)
            hvps += info.iterations
        except SolverError:  # negative curvature: steepest descent this step
            d = gw
        slope = item(T.vdot(gw, d))
        if not slope > 0:
            d, slope = gw, gnorm**2
        f0, t = item(fval), 1.0
        while t > 1e-10:
            w_new = T.axpy(-t, d, w)
            with torch.no_grad():  # no graph for line-search trials
                trial = item(loss(w_new))
            if trial <= f0 - 1e-4 * t * slope:
                break
            t *= 0.5
        w = w_new
        hvp = None  # free this step's graph before the next is built
    with torch.no_grad():
        final = item(loss(w))
    info = MinimizeInfo(k, hvps, gnorm, converged, final)
    _report("newton_cg", "Newton-CG", info, gnorm0 or 1.0, tol,
            "Raise maxiter (or cg_maxiter), or check that inner_loss is smooth and bounded below.")
    return T.tree_unflatten(w, wspec), info


def _value_and_grad(loss: Callable[[Leaves], torch.Tensor], plain: bool) -> Callable[[Leaves], tuple[float, Leaves]]:
    """w ↦ (g(w) as a float, ∇g(w)): plain autograd outside torch.func transforms."""
    if not plain:
        grad_g = grad_and_value(loss)

        def under_transform(w: Leaves) -> tuple[float, Leaves]:
            gw, fval = grad_g(w)
            return item(fval), list(gw)

        return under_transform

    def eager(w: Leaves) -> tuple[float, Leaves]:
        with torch.enable_grad():
            wr = _fresh_leaves(w)
            fval = loss(wr)
            return fval.item(), _grads(fval, wr)

    return eager


@eager  # under torch.compile: runs eagerly (a graph break), never mis-traced
def lbfgs(
    inner_loss: Callable[[Any, Any], torch.Tensor],
    params0: Any,
    hparams: Any,
    *,
    maxiter: int = 500,
    tol: float = 1e-10,
    history: int = 10,
) -> tuple[Any, MinimizeInfo]:
    """Minimise ``inner_loss(params, hparams)`` over ``params`` from ``params0`` by L-BFGS.

    Stops when ``‖∇_w g‖ ≤ tol·max(1, ‖∇_w g(params0)‖)`` or after ``maxiter`` steps.
    Returns ``(params, MinimizeInfo)``, ``params`` detached and shaped like ``params0``.
    ``g`` should be differentiable and bounded below; the hypergradient at the result is
    as accurate as the result is stationary (check ``info.grad_norm``).
    """
    check_count("history", history, 1)
    w, wspec, lam, loss = _inner_problem(inner_loss, params0, hparams, maxiter, tol)
    value_and_grad = _value_and_grad(loss, _plain_autograd(w, lam))
    fval, gw = value_and_grad(w)
    evals, k, converged = 1, 0, False
    gnorm = item(T.norm(gw))
    scale = max(1.0, gnorm)
    pairs: list[tuple[Leaves, Leaves, float]] = []  # (s, y, 1 / yᵀs), oldest first
    eps = torch.finfo(w[0].dtype).eps
    for k in range(maxiter + 1):
        if not (math.isfinite(fval) and math.isfinite(gnorm)):
            raise SolverError("lbfgs: NaN/Inf loss or gradient; check inner_loss and params0.")
        if gnorm <= tol * scale:
            converged = True
            break
        if k == maxiter:
            break
        d = _two_loop(gw, pairs) if pairs else T.scale(1.0 / gnorm, gw)  # ≈ H⁻¹ ∇g
        slope = item(T.vdot(gw, d))
        if not slope > 0:  # not a descent direction (rounding, or a stale pair): restart
            pairs.clear()
            d, slope = T.scale(1.0 / gnorm, gw), gnorm
        t = 1.0
        # near the solution, loss differences fall below rounding and Armijo cannot be
        # checked: there a step that keeps the loss within rounding and shrinks ‖∇g‖ counts
        slack = 100 * eps * max(1.0, abs(fval))
        while True:
            w_new = T.axpy(-t, d, w)
            f_new, g_new = value_and_grad(w_new)
            evals += 1
            gnorm_new = item(T.norm(g_new))
            if f_new <= fval - 1e-4 * t * slope or (f_new <= fval + slack and gnorm_new < gnorm) or t < 1e-12:
                break
            t *= 0.5
        s_k, y_k = T.sub(w_new, w), T.sub(g_new, gw)
        sy = item(T.vdot(s_k, y_k))
        if sy > 1e-12 * item(T.norm(s_k)) * item(T.norm(y_k)):  # curvature pair usable
            pairs.append((s_k, y_k, 1.0 / sy))
            if len(pairs) > history:
                pairs.pop(0)
        w, fval, gw, gnorm = w_new, f_new, g_new, gnorm_new
    kept = list(pairs)

    def inverse_hessian(v: Any) -> Any:
        leaves, spec = T.tree_flatten(v)
        return T.tree_unflatten(_two_loop(leaves, kept), spec)

    info = MinimizeInfo(k, 0, gnorm, converged, fval, evals, inverse_hessian)
    _report("lbfgs", "L-BFGS", info, scale, tol,
            "Raise maxiter (or history), use newton_cg for a smooth inner_loss, or check that "
            "inner_loss is smooth and bounded below.")
    return T.tree_unflatten(w, wspec), info


def _two_loop(q: Leaves, pairs: list[tuple[Leaves, Leaves, float]]) -> Leaves:
    """H_k q by the L-BFGS two-loop recursion, H_0 = (sᵀy / yᵀy) I from the newest pair; a
    linear, symmetric positive definite map of q (the identity with no pairs)."""
    if not pairs:
        return list(q)
    # on the CPU outside vmap the coefficients are Python floats: one fused op per update
    dot = (lambda x, y: T.vdot(x, y).item()) if _host_scalars(q) else T.vdot
    alphas = []
    for s_i, y_i, rho in reversed(pairs):
        a = rho * dot(s_i, q)
        q = T.axpy(-a, y_i, q)
        alphas.append(a)
    _, y_n, rho_n = pairs[-1]
    q = T.scale(1.0 / (rho_n * dot(y_n, y_n)), q)
    for (s_i, y_i, rho), a in zip(pairs, reversed(alphas)):
        q = T.axpy(a - rho * dot(y_i, q), s_i, q)
    return q

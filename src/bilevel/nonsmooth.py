"""Nonsmooth fixed points: FISTA to solve them, and NSID, their stochastic implicit derivative.

Grazzi, Pontil & Salzo, "Nonsmooth Implicit Differentiation: Deterministic and Stochastic
Convergence Rates", ICML 2024.  For a piecewise Lipschitz-smooth contraction
``w(λ) = Φ(w(λ), λ)`` (e.g. :func:`bilevel.prox.proximal_gradient` for the Lasso or the
elastic net) deterministic AID and ITD keep their linear rates when differentiated with the
conservative Jacobian that autograd gives (:mod:`bilevel.prox`): use
:func:`bilevel.hypergrad` (``fixed_point=Φ``, a non-symmetric solver) and
:func:`bilevel.unroll` as they are.  This module adds:

* :func:`fista` — the fixed point of a :class:`~bilevel.prox.ProximalGradient` map by
  accelerated proximal gradient with restart, after an eager check that the step makes Φ
  a contraction, and with divergence detection;
* :func:`nsid` — the stochastic implicit derivative for composite maps
  ``Φ(w, λ) = G(T(w, λ), λ)`` whose inner map ``T`` is reachable only through unbiased
  minibatch estimates ``T̂(w, λ, ξ)`` (:class:`CompositeMap`), with the step sizes of the
  analysis;
* :func:`stochastic_proximal_gradient` — the stochastic inner solver that feeds it.

Batches, step-size values and their rules are those of :mod:`bilevel.stochastic`: any
iterable of batches (a ``DataLoader``, a list, a generator) or a
:class:`~bilevel.stochastic.BatchStream` (which counts the samples drawn);
:class:`~bilevel.stochastic.ConstantStep` / :class:`~bilevel.stochastic.DecreasingStep`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.func import grad, jvp, vjp

from bilevel import _tree as T
from bilevel._checks import (
    DIVERGENCE_FACTOR,
    all_finite,
    check_batch,
    check_count,
    check_finite,
    check_input_finite,
    check_not_diverging,
    check_reached,
    check_shaped_like,
    check_tol,
    eager,
    info_number,
    info_pytree,
    prepare_pair,
    scalar,
    unreached,
    warn_unconverged,
)
from bilevel.ift import _tree_fn
from bilevel.linear_solve import SolveInfo
from bilevel.prox import ProximalGradient, _hessian_spectrum
from bilevel.stochastic import BatchStream, DecreasingStep, StepSize, as_step_size, as_stream

__all__ = [
    "fista",
    "CompositeMap",
    "proximal_gradient_composite",
    "stochastic_proximal_gradient",
    "nsid",
    "NSIDInfo",
]

Leaves = list[torch.Tensor]


# ----------------------------------------------------------------------------- deterministic


@eager  # under torch.compile: runs eagerly (a graph break), never mis-traced
def fista(
    fixed_point: ProximalGradient,
    params0: Any,
    hparams: Any,
    *,
    maxiter: int = 10_000,
    tol: float = 1e-12,
) -> tuple[Any, SolveInfo]:
    """The fixed point of a proximal-gradient map by FISTA with adaptive restart.

    ``y_k = w_k + (t_{k−1} − 1)/t_k·(w_k − w_{k−1})``, ``w_{k+1} = Φ(y_k, λ)`` (Beck &
    Teboulle, 2009), momentum reset whenever ``⟨y_k − w_{k+1}, w_{k+1} − w_k⟩ > 0``
    (O'Donoghue & Candès, 2015), which keeps a linear rate on strongly convex problems
    with ``O(√κ)`` rather than ``O(κ)`` iterations.  Stops when the relative residual
    ``‖Φ(y_k) − y_k‖ / ‖Φ(y_k)‖ ≤ tol`` and returns ``(w, SolveInfo)`` with ``w = Φ(y_k)``
    (detached, shaped like ``params0``; no autograd graph is built — differentiate the
    fixed point with :func:`bilevel.hypergrad`).

    Before iterating, ``max|1 − η·eig(∇²g)|`` is estimated at ``params0`` (power iteration,
    60 Hessian–vector products): above 1 the step breaks the contraction and a
    ``ValueError`` says which step would work.  Φ is a contraction for ``η < 2/L``, but
    FISTA's momentum needs ``η ≤ 1/L``: with ``1/L < η < 2/L`` it may diverge although Φ
    contracts (then iterate Φ itself, e.g. with :func:`bilevel.fixed_point_solve` and
    :class:`bilevel.Picard`, or lower the step).  A residual that grows ``10⁶``-fold, turns
    NaN/Inf, or clearly grows over a run that missed ``tol`` raises
    :class:`~bilevel.NotContractionError`, whose message tells these cases apart; a run
    that stops at ``maxiter`` above ``tol`` warns (:class:`~bilevel.ConvergenceWarning`).
    """
    if not isinstance(fixed_point, ProximalGradient):
        raise TypeError(
            "fista: fixed_point should be a ProximalGradient (bilevel.prox.proximal_gradient); "
            "for another contraction use bilevel.fixed_point_solve. "
            f"Got {type(fixed_point).__name__}."
        )
    check_count("fista: maxiter", maxiter, 1)
    tol = check_tol("fista: tol", tol)
    w, wspec, lam, lspec = prepare_pair(params0, hparams, "params0")
    lo, hi = _check_prox_step(fixed_point, T.tree_unflatten(w, wspec), T.tree_unflatten(lam, lspec))
    fix = _fista_advice(fixed_point.step, lo, hi)
    phi = _map_leaves(fixed_point, wspec, lspec, "fixed_point")
    y, t, r, k, start = w, 1.0, math.inf, 0, math.inf
    history: list[torch.Tensor] = []  # ‖Φ(y_k) − y_k‖, judged by check_not_diverging
    with torch.no_grad():
        while k < maxiter:
            new = phi(y, lam)
            step = T.sub(new, y)
            # one host sync per iteration for the stopping test and the restart test
            norms = torch.stack([T.norm(step), T.norm(new), T.vdot(step, T.sub(new, w))])
            dist, size, turn = norms.tolist()
            history.append(norms[0])
            r = dist / size if size > 0 else dist
            k += 1
            start = dist if k == 1 else start
            if not math.isfinite(dist) or dist > DIVERGENCE_FACTOR * start:  # a blow-up: stop and judge now
                check_not_diverging(history, new, "fista", fix)
            if r <= tol:
                w = new
                break
            if turn < 0:  # ⟨y − w⁺, w⁺ − w⟩ > 0: restart
                t_next, beta = 1.0, 0.0
            else:
                t_next = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
                beta = (t - 1) / t_next
            y = T.axpy(beta, T.sub(new, w), new)
            w, t = new, t_next
    if r > tol:
        check_not_diverging(history, w, "fista", fix)
        momentum = fixed_point.step * hi > 1 + 1e-6 and lo >= 0
        warn_unconverged("fista", "FISTA", k, r, tol, fix if momentum else "Raise maxiter.")
    return T.tree_unflatten(w, wspec), SolveInfo("FISTA", k, r, r <= tol)


def _fista_advice(step: float, lo: float, hi: float) -> str:
    """Why FISTA on a proximal-gradient map with this step may diverge, from the Hessian's
    spectrum ``[lo, hi]`` estimated at params0."""
    if step * hi > 1 + 1e-6 and lo >= 0:
        return (
            f"The proximal-gradient map Φ IS a contraction at this step (η·L ≈ {step * hi:.3g} < 2, "
            f"L = λ_max(∇²_w smooth_loss) ≈ {hi:.4g}), but FISTA's momentum needs step ≤ 1/L ≈ "
            f"{1 / hi:.4g}: use proximal_gradient(..., step ≤ 1/L) with fista, or iterate Φ without "
            "momentum (bilevel.fixed_point_solve(lambda w: Φ(w, hparams), params0, bilevel.Picard()))."
        )
    return (
        "Φ is not a contraction along the iterates: lower the step (it must be < 2/L, L the Lipschitz "
        "constant of ∇_w smooth_loss, which can be larger away from params0; FISTA needs step ≤ 1/L), "
        "and check the data for NaN/Inf."
    )


def _check_prox_step(phi: ProximalGradient, params: Any, hparams: Any) -> tuple[float, float]:
    """Raise ``ValueError`` unless Φ contracts at ``params``; return the estimated Hessian spectrum."""
    lo, hi = _hessian_spectrum(phi.gradient, params, hparams, iters=30)
    q = max(abs(1 - phi.step * lo), abs(1 - phi.step * hi))
    if q > 1 + 1e-6:
        if lo < 0 and 1 - phi.step * lo >= q - 1e-12:
            why = (
                f"∇²_w smooth_loss has a negative eigenvalue (≈ {lo:.3g}): smooth_loss is "
                "not convex there, so no step makes Φ a contraction"
            )
        else:
            why = (
                f"step η = {phi.step:.4g} is too large: L = λ_max(∇²_w smooth_loss) ≈ {hi:.4g}, "
                f"so η·L ≈ {phi.step * hi:.3g} ≥ 2; use step ≤ 1/L ≈ {1 / hi:.4g}"
            )
        raise ValueError(
            f"proximal_gradient is not a contraction at params0 (estimated factor "
            f"max|1 − η·eig(∇²g)| ≈ {q:.4g} > 1): {why}."
        )
    return lo, hi


def _map_leaves(fn: Callable[..., Any], wspec: Any, lspec: Any, name: str):
    """fn(params, hparams[, extra]) as a function of leaves, output structure checked once."""
    checked = [False]

    def out(w: Leaves, lam: Leaves, *extra: Any) -> Leaves:
        res, ospec = T.tree_flatten(
            fn(T.tree_unflatten(list(w), wspec), T.tree_unflatten(list(lam), lspec), *extra)
        )
        if not checked[0]:
            check_shaped_like(res, ospec, w, wspec, name)
            checked[0] = True
        return res

    return out


# ----------------------------------------------------------------------------- stochastic


@dataclass(frozen=True)
class CompositeMap:
    """``Φ(w, λ) = G(T(w, λ), λ)`` with ``T(w, λ) = E_ξ[T̂(w, λ, ξ)]`` — NSID's setting.

    ``inner(params, hparams, batch)`` is the unbiased minibatch estimate ``T̂`` of the
    (smooth) inner map; ``outer(u, hparams)`` is the (possibly nonsmooth) outer map ``G``,
    evaluated exactly.  Both return pytrees shaped like ``params``.  ``Φ`` should be a
    contraction in ``w``.  :func:`proximal_gradient_composite` builds one for
    ``g = E_ξ ĝ(·, ξ)`` plus a prox.
    """

    inner: Callable[[Any, Any, Any], Any]
    outer: Callable[[Any, Any], Any]

    def __post_init__(self) -> None:
        if not callable(self.inner) or not callable(self.outer):
            raise TypeError("CompositeMap: inner and outer should be callables.")

    def __call__(self, params: Any, hparams: Any, batch: Any) -> Any:
        """``G(T̂(params, hparams, batch), hparams)``."""
        return self.outer(self.inner(params, hparams, batch), hparams)


def proximal_gradient_composite(
    batch_loss: Callable[[Any, Any, Any], torch.Tensor],
    prox: Callable[[Any, Any, float], Any],
    step: float,
) -> CompositeMap:
    """Proximal gradient as a :class:`CompositeMap`: ``T̂(w, λ, ξ) = w − η∇_w ĝ(w, λ, ξ)``,
    ``G(u, λ) = prox(u, λ, η)``.

    ``batch_loss(params, hparams, batch)`` is an unbiased estimate of the smooth part ``g``
    (e.g. the mean loss over the batch); ``prox`` as in :func:`bilevel.prox.proximal_gradient`.
    """
    ProximalGradient(batch_loss, prox, step)  # validates prox and step

    def inner(params: Any, hparams: Any, batch: Any) -> Any:
        g = grad(lambda p: scalar(batch_loss(p, hparams, batch), "batch_loss"))(params)
        return T.tree_map(lambda w, gw: w - step * gw, params, g)

    return CompositeMap(inner, lambda u, hparams: prox(u, hparams, step))


@eager  # under torch.compile: runs eagerly (a graph break), never mis-traced
def stochastic_proximal_gradient(
    params0: Any,
    hparams: Any,
    batches: Iterable[Any] | BatchStream,
    *,
    batch_loss: Callable[[Any, Any, Any], torch.Tensor],
    prox: Callable[[Any, Any, float], Any],
    steps: int,
    step_size: StepSize | float,
) -> Any:
    """Stochastic proximal gradient ``w_{i+1} = prox(w_i − η_i∇_w ĝ(w_i, λ, ξ_i), λ, η_i)``.

    The inner solver NSID is fed with; one batch ``ξ_i`` per step from ``batches``.  For a
    μ-strongly convex, L-smooth ``g`` take ``step_size = DecreasingStep(2/μ, 2L/μ)``
    (``η_0 = 1/L``, ``E‖w_t − w(λ)‖² = O(1/t)``).  Returns ``w_t`` (detached, shaped like
    ``params0``); pass a :class:`~bilevel.stochastic.BatchStream` to count the samples.
    Raises :class:`~bilevel.NotContractionError` when the iterations diverge (NaN/Inf, a
    blow-up, or gradient-mapping norms ``‖w_{i+1} − w_i‖/η_i`` that clearly grow: see
    :func:`bilevel._checks.check_not_diverging`), as a step above ``2/L`` does.
    """
    check_count("steps", steps, 1)
    eta = as_step_size(step_size, "step_size")
    w, wspec, lam, lspec = prepare_pair(params0, hparams, "params0")
    stream = as_stream(batches)

    def loss(wl: Leaves, ll: Leaves, batch: Any) -> torch.Tensor:
        p, h = T.tree_unflatten(list(wl), wspec), T.tree_unflatten(list(ll), lspec)
        return scalar(batch_loss(p, h, batch), "batch_loss")

    grad_w = grad(loss)
    prox_leaves = _map_leaves(prox, wspec, lspec, "prox")
    fix = ("The step size must be < 2/L (L the Lipschitz constant of ∇_w batch_loss, for every batch): "
           "lower step_size, or check the data for NaN/Inf.")
    norms = []  # gradient-mapping norms ‖w_{i+1} − w_i‖/η_i, on the device: judged at the end
    for i in range(steps):
        e = eta(i)
        with torch.no_grad():
            new = prox_leaves(T.axpy(-e, grad_w(w, lam, stream.next()), w), lam, e)
            norms.append(T.norm(T.sub(new, w)) / e)
            w = new
        if (i + 1) % 100 == 0 and not all_finite(w):  # a host sync, so only now and then: stop early
            break
    check_not_diverging(norms, w, "stochastic_proximal_gradient", fix)
    return T.tree_unflatten(w, wspec)


@partial(info_pytree, static=("steps", "samples", "q"))  # returnable under vmap
@dataclass(frozen=True)
class NSIDInfo:
    """What :func:`nsid` did.

    ``steps``: stochastic linear-system iterations; ``samples``: examples drawn for them
    (``mean_batch`` not included); ``q``: the contraction factor behind the default step
    sizes (``None`` when ``step_size`` was given); ``inner_residual``:
    ``‖G(T̂(w, λ, mean_batch), λ) − w‖``; ``v``: the final linear-system iterate, shaped like
    ``params`` (pass as ``init=`` to warm-start).
    """

    steps: int
    samples: int
    q: float | None
    inner_residual: float | torch.Tensor
    outer_loss: float | torch.Tensor
    v: Any


@eager  # under torch.compile: runs eagerly (a graph break), never mis-traced
def nsid(
    outer_loss: Callable[[Any, Any], torch.Tensor],
    params: Any,
    hparams: Any,
    batches: Iterable[Any] | BatchStream,
    *,
    fixed_point: CompositeMap,
    mean_batch: Any,
    steps: int,
    step_size: StepSize | float | None = None,
    init: Any = None,
    return_info: bool = False,
) -> Any:
    """NSID: stochastic implicit differentiation of a nonsmooth composite fixed point.

    For ``w(λ) = G(T(w(λ), λ), λ)`` with ``T = E_ξ T̂(·, ·, ξ)`` (Grazzi, Pontil & Salzo,
    ICML 2024), at ``w = params`` (an approximation of ``w(λ)``, e.g. from
    :func:`stochastic_proximal_gradient`):

    1. ``w̄ = T̂(w, λ, mean_batch)`` — one estimate of ``T(w, λ)``, where the Jacobians of
       ``G`` are taken (pass the full data or a large batch: near a kink of ``G`` a noisy
       ``w̄`` can pick the wrong piece);
    2. ``v_{i+1} = (1 − η_i) v_i + η_i (∂_wT̂(w, λ, ξ_i)ᵀ ∂_uG(w̄, λ)ᵀ v_i + ∇_w f)``,
       ``i < steps``, one fresh batch ``ξ_i`` from ``batches`` per step;
    3. returns ``∇_λ f + (∂_λ[G(T̂(w, λ, mean_batch), λ)])ᵀ v_k``, shaped like ``hparams``.

    ``step_size`` (``η_i ∈ (0, 1]``) defaults to ``DecreasingStep.for_contraction(q)``:
    ``η_i = β/(γ + i)``, ``β = γ = 2/(1 − q²)``, with ``q`` the norm of ``∂_wΦ`` at ``w``
    estimated by power iteration on the ``mean_batch`` map.  Why: if every minibatch map is
    a ``q``-contraction, convexity of ``‖·‖²`` gives ``E‖e_{i+1}‖² ≤ (1 − η_i(1 − q²))‖e_i‖²
    + η_i²σ²`` for the linear-system error, so ``β(1 − q²) > 1`` yields ``O(1/k)`` and
    ``γ ≥ β`` keeps ``η_i ≤ 1`` (β = γ = 2/(1 − q²) is the authors' choice).  Use batches
    large enough that ``T̂`` is a contraction, or a larger ``β``.  With ``w`` exact the mean squared error is
    ``O(1/k)``; with every batch the full data and ``η_i = 1`` NSID is AID with fixed-point
    iterations.  Raises ``ValueError`` for bad input (a batch or ``mean_batch`` with 0 rows
    included), :class:`~bilevel.NotContractionError` when the linear-system iterations diverge
    (NaN/Inf, a blow-up, or residual norms that clearly grow: a ``step_size`` on a map that is
    not a contraction), :class:`~bilevel.SolverError` for NaN/Inf in the result.
    """
    if not isinstance(fixed_point, CompositeMap):
        raise TypeError(
            "nsid: fixed_point should be a CompositeMap(inner, outer) (see "
            "proximal_gradient_composite); for a map you can evaluate exactly use "
            f"bilevel.hypergrad(fixed_point=...). Got {type(fixed_point).__name__}."
        )
    check_count("steps", steps, 1)
    w, wspec, lam, lspec = prepare_pair(params, hparams, "params")
    stream = as_stream(batches)
    check_batch(mean_batch, "nsid: mean_batch")

    f = _tree_fn(outer_loss, wspec, lspec)
    fval, f_vjp = vjp(lambda wl, ll: scalar(f(wl, ll), "outer_loss"), w, lam)
    gw, gl = f_vjp(torch.ones_like(fval))
    check_finite(gw, "∇_w outer_loss")

    inner = _map_leaves(fixed_point.inner, wspec, lspec, "CompositeMap.inner")
    outer = _map_leaves(fixed_point.outer, wspec, lspec, "CompositeMap.outer")
    # w̄ = T̂(w, λ, mean_batch) and the pullbacks of G at (w̄, λ): built once, used k times
    wbar, inner_lam_vjp = vjp(lambda ll: inner(w, ll, mean_batch), lam)
    wbar = [t.detach() for t in wbar]
    check_finite(wbar, "T̂(params, hparams, mean_batch)")
    phi_bar, outer_vjp = vjp(outer, wbar, lam)

    q = None
    if step_size is None:
        q = _jacobian_norm(lambda wl: outer(inner(wl, lam, mean_batch), lam), w)
        if not q < 1:
            raise ValueError(
                f"nsid: the map is not a contraction at params (‖∂_wΦ‖ ≈ {q:.4g} ≥ 1), so "
                "the default step sizes do not apply; lower the step inside the map, or "
                "pass step_size= if you know better."
            )
        step_size = DecreasingStep.for_contraction(q)
    eta = as_step_size(step_size, "step_size")

    if init is None:
        v = T.zeros_like(w)
    else:
        v, ispec = T.tree_flatten(init)
        if ispec != wspec or any(a.shape != b.shape for a, b in zip(v, w)):
            raise ValueError(f"init should be shaped like params, got {T.describe(init)}.")
        v = [t.detach() for t in v]
        check_input_finite(v, "init")
    samples0 = stream.samples
    norms = []  # ‖J̃ᵢᵀvᵢ + ∇_w f − vᵢ‖ per step, on the device: judged once at the end
    for i in range(steps):
        e = eta(i)
        if not e <= 1:
            raise ValueError(
                f"nsid: step_size({i}) = {e!r}; NSID's step sizes are averaging weights and "
                "should lie in (0, 1] (DecreasingStep(beta, gamma) with gamma >= beta)."
            )
        batch = stream.next()
        _, inner_w_vjp = vjp(lambda wl, b=batch: inner(wl, lam, b), w)
        jv = inner_w_vjp(list(outer_vjp(v)[0]))[0]  # ∂_wT̂(w, λ, ξ_i)ᵀ ∂_uG(w̄, λ)ᵀ v_i
        r = [ji + gi - vi for vi, ji, gi in zip(v, jv, gw)]
        norms.append(T.norm(r))
        v = T.axpy(e, r, v)  # (1 − η_i) v_i + η_i (J̃ᵢᵀ v_i + ∇_w f)
    check_not_diverging(
        norms, v, "NSID's linear-system iterations",
        "They contract when Φ = G∘T̂ does (‖∂_wΦ‖ < 1; for proximal_gradient_composite the step "
        "inside the map must be < 2/L, L the Lipschitz constant of ∇_w batch_loss) and step_size "
        "≤ 1: lower the step inside the map, or step_size (the default DecreasingStep.for_contraction "
        "checks the contraction first).",
    )

    g_u, g_lam = outer_vjp(v)
    hg = T.add(T.add(gl, list(g_lam)), list(inner_lam_vjp(list(g_u))[0]))
    check_finite(hg, "the hypergradient")
    check_reached(hg, lspec, lambda: _unused(f, fixed_point, w, lam, wspec, lspec, mean_batch))
    out = T.tree_unflatten([t.detach() for t in hg], lspec)
    if not return_info:
        return out
    info = NSIDInfo(
        steps,
        stream.samples - samples0,
        q,
        info_number(T.norm(T.sub(phi_bar, w))),
        info_number(fval),
        T.tree_unflatten([t.detach() for t in v], wspec),
    )
    return out, info


def _jacobian_norm(phi: Callable[[Leaves], Leaves], w: Leaves, iters: int = 30) -> float:
    """‖∂_wΦ(w)‖₂ by power iteration on JᵀJ (one jvp and one vjp per iteration)."""
    _, pull = vjp(phi, w)
    gen = torch.Generator(device=w[0].device).manual_seed(0)
    x = [torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in w]
    x = T.scale(1 / T.norm(x), x)
    est = torch.zeros((), dtype=w[0].dtype)
    for _ in range(iters):
        y = list(pull(list(jvp(phi, (w,), (x,))[1]))[0])
        est = T.norm(y)
        if not bool(est > 0):
            break
        x = T.scale(1 / est, y)
    return math.sqrt(max(float(est), 0.0))


def _unused(f, fixed_point: CompositeMap, w, lam, wspec, lspec, mean_batch) -> list[int]:
    """hparams leaves with no autograd path to f or to G(T̂(w, λ, mean_batch), λ)."""

    def reached(ll: Leaves) -> list[Any]:
        wl = [t.detach() for t in w]
        return [f(wl, ll), *T.tree_flatten(fixed_point(T.tree_unflatten(wl, wspec), T.tree_unflatten(ll, lspec),
                                                         mean_batch))[0]]

    return unreached(reached, lam)
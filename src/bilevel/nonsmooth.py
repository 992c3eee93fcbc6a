"""Nonsmooth fixed points: solving them, and NSID, their stochastic implicit derivative.

Grazzi, Pontil & Salzo, "Nonsmooth Implicit Differentiation: Deterministic and Stochastic
Convergence Rates", ICML 2024.  For a piecewise Lipschitz-smooth contraction
``w(λ) = Φ(w(λ), λ)`` (e.g. :func:`bilevel.prox.proximal_gradient` for the Lasso or the
elastic net) deterministic AID and ITD keep their linear rates when differentiated with the
conservative Jacobian that autograd gives (:mod:`bilevel.prox`): use
:func:`bilevel.hypergrad` (``fixed_point=Φ``, a non-symmetric solver) and
:func:`bilevel.unroll` as they are.  This module adds:

* :func:`solve_fixed_point` — Picard iterations ``w ← Φ(w, λ)`` to a tolerance, with an
  eager contraction check for a :class:`~bilevel.prox.ProximalGradient` and divergence
  detection for any map;
* :func:`nsid` — the stochastic implicit derivative for composite maps
  ``Φ(w, λ) = G(T(w, λ), λ)`` whose inner map ``T`` is reachable only through unbiased
  minibatch estimates ``T̂(w, λ, ξ)`` (:class:`CompositeMap`);
* :func:`stochastic_proximal_gradient` — the stochastic inner solver that feeds it;
* :class:`DecreasingStep` — the step sizes ``η_i = β/(γ + i)`` of the analysis.

Batches come from any iterable (a ``torch.utils.data.DataLoader``, a list, a generator).
A re-iterable one (DataLoader, list) is cycled through as many epochs as needed; a one-shot
iterator that runs out raises a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad, jvp, vjp

from bilevel import _tree as T
from bilevel.implicit import _check_input_finite, _check_reached, _leaves, _scalar, _tree_fn
from bilevel.linear_solve import NotContractionError, SolverError, _item, check_finite
from bilevel.prox import ProximalGradient, hessian_spectrum

__all__ = [
    "solve_fixed_point",
    "FixedPointInfo",
    "CompositeMap",
    "proximal_gradient_composite",
    "DecreasingStep",
    "stochastic_proximal_gradient",
    "nsid",
    "NSIDInfo",
]

Leaves = list[torch.Tensor]
_DIVERGENCE_FACTOR = 1e6


# ----------------------------------------------------------------------------- deterministic


@dataclass(frozen=True)
class FixedPointInfo:
    """What :func:`solve_fixed_point` did: Picard steps, final ``‖Φ(w) − w‖``, and whether it
    reached ``tol·max(1, ‖w‖)``."""

    iterations: int
    residual: float
    converged: bool


def solve_fixed_point(
    fixed_point: Callable[[Any, Any], Any],
    params0: Any,
    hparams: Any,
    *,
    maxiter: int = 10_000,
    tol: float = 1e-12,
) -> tuple[Any, FixedPointInfo]:
    """Iterate ``w ← Φ(w, λ)`` from ``params0`` until ``‖Φ(w) − w‖ ≤ tol·max(1, ‖w‖)``.

    Returns ``(w, FixedPointInfo)`` with ``w`` detached, shaped like ``params0``.  For a
    :class:`~bilevel.prox.ProximalGradient` the step is checked first: if the estimated
    factor ``max|1 − η·eig(∇²g)|`` at ``params0`` exceeds 1 a ``ValueError`` says which
    step would work.  For any map, a residual that grows ``10⁶``-fold or turns NaN/Inf
    raises :class:`~bilevel.NotContractionError`.
    """
    if not isinstance(maxiter, int) or isinstance(maxiter, bool) or maxiter < 0:
        raise ValueError(f"maxiter should be an int >= 0, not {maxiter!r}.")
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol should be a finite float >= 0, not {tol!r}.")
    w, wspec = _leaves(params0, "params0")
    lam, lspec = _leaves(hparams, "hparams")
    w = [t.detach() for t in w]
    lam = [t.detach() for t in lam]
    _check_input_finite(w, "params0")
    _check_input_finite(lam, "hparams")
    if isinstance(fixed_point, ProximalGradient):
        _check_prox_step(fixed_point, T.tree_unflatten(w, wspec), T.tree_unflatten(lam, lspec))
    phi = _map_leaves(fixed_point, wspec, lspec, "fixed_point")
    every = 1 if w[0].device.type == "cpu" else 10
    res, start, k = None, None, 0
    with torch.no_grad():
        while k < maxiter:
            new = phi(w, lam)
            res = T.norm(T.sub(new, w))
            w, k = new, k + 1
            if k % every and k < maxiter:
                continue
            r = float(res)
            if start is None:
                start = max(r, 1e-300)
            if not math.isfinite(r) or r > _DIVERGENCE_FACTOR * start:
                raise NotContractionError(
                    f"the fixed-point iteration diverged: ‖Φ(w) − w‖ went from {start:.3g} to "
                    f"{r:.3g} in {k} steps, so Φ is not a contraction here. For "
                    "proximal_gradient lower the step (it must be < 2/L, L the Lipschitz "
                    "constant of ∇_w smooth_loss); check the data for NaN/Inf."
                )
            if r <= tol * max(1.0, float(T.norm(w))):
                break
    r = float("nan") if res is None else float(res)
    converged = res is not None and r <= tol * max(1.0, float(T.norm(w)))
    return T.tree_unflatten(w, wspec), FixedPointInfo(k, r, bool(converged))


def _check_prox_step(phi: ProximalGradient, params: Any, hparams: Any) -> None:
    lo, hi = hessian_spectrum(phi.smooth_loss, params, hparams, iters=30)
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


def _map_leaves(fn: Callable[..., Any], wspec: Any, lspec: Any, name: str, batched: bool = False):
    """fn(params, hparams[, batch]) as a function of leaves, output structure checked once."""
    checked = [False]

    def out(w: Leaves, lam: Leaves, *batch: Any) -> Leaves:
        res, ospec = T.tree_flatten(
            fn(T.tree_unflatten(list(w), wspec), T.tree_unflatten(list(lam), lspec), *batch)
        )
        if not checked[0]:
            if ospec != wspec or any(
                not isinstance(o, torch.Tensor) or o.shape != x.shape for o, x in zip(res, w)
            ):
                raise ValueError(
                    f"{name} should return a pytree with the structure and shapes of params "
                    f"({T.describe(T.tree_unflatten(list(w), wspec))}), got "
                    f"{T.describe(T.tree_unflatten(res, ospec))}."
                )
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
    ProximalGradient(lambda w, lam: 0, prox, step)  # validates prox and step

    def inner(params: Any, hparams: Any, batch: Any) -> Any:
        g = grad(lambda p: _scalar(batch_loss(p, hparams, batch), "batch_loss"))(params)
        return T.tree_map(lambda w, gw: w - step * gw, params, g)

    return CompositeMap(inner, lambda u, hparams: prox(u, hparams, step))


@dataclass(frozen=True)
class DecreasingStep:
    """Step sizes ``η_i = beta / (gamma + i)``, ``i = 0, 1, …``.

    For NSID's linear-system iteration the per-step error factor is ``1 − η_i(1 − q²)``
    (``q`` the contraction factor of Φ), so ``beta·(1 − q²) > 1`` gives the ``O(1/k)`` mean
    squared error of the analysis and ``gamma ≥ beta`` keeps ``η_i ≤ 1``.
    :meth:`for_contraction` gives ``beta = gamma = 2/(1 − q²)`` (``η_0 = 1``), the choice of
    the authors' experiments.
    """

    beta: float
    gamma: float

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"DecreasingStep: {name} should be a finite float > 0, not {v!r}.")

    def __call__(self, i: int) -> float:
        return self.beta / (self.gamma + i)

    @classmethod
    def for_contraction(cls, q: float) -> DecreasingStep:
        """``beta = gamma = 2/(1 − q²)`` for a map with contraction factor ``q ∈ [0, 1)``."""
        if not (isinstance(q, (int, float)) and 0 <= q < 1):
            raise ValueError(
                f"DecreasingStep.for_contraction: q should be in [0, 1) (a contraction), not {q!r}."
            )
        b = 2.0 / (1.0 - q * q)
        return cls(b, b)


def _steps_fn(step_size: Any, name: str) -> Callable[[int], float]:
    if isinstance(step_size, (int, float)) and not isinstance(step_size, bool):
        value = float(step_size)
        return lambda i: value
    if callable(step_size):
        return step_size
    raise TypeError(f"{name} should be a float, a DecreasingStep or a callable i -> float, not {step_size!r}.")


def _batch_stream(batches: Iterable[Any], needed: int) -> Iterator[Any]:
    """Yield batches, cycling a re-iterable; a clear error when none or too few come."""
    if not isinstance(batches, Iterable):
        raise TypeError(
            f"batches should be an iterable of batches (a DataLoader, a list, a generator), "
            f"not {type(batches).__name__}."
        )
    one_shot = iter(batches) is batches
    served = 0
    while True:
        epoch = 0
        for b in batches:
            epoch += 1
            served += 1
            yield b
        if epoch == 0 or one_shot:
            if served == 0:
                raise ValueError("batches is empty: it should yield at least one batch.")
            raise ValueError(
                f"batches ran out after {served} batches, but {needed} are needed. Pass a "
                "re-iterable (a DataLoader or a list, cycled as needed) or a longer iterator."
            )


def _batch_size(batch: Any) -> int:
    leaves = T.tree_flatten(batch)[0]
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            return int(t.shape[0])
    return 1


def _check_count(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} should be an int >= 1, not {value!r}.")


def stochastic_proximal_gradient(
    batch_loss: Callable[[Any, Any, Any], torch.Tensor],
    prox: Callable[[Any, Any, float], Any],
    params0: Any,
    hparams: Any,
    batches: Iterable[Any],
    *,
    steps: int,
    step_size: DecreasingStep | Callable[[int], float] | float,
) -> tuple[Any, int]:
    """Stochastic proximal gradient ``w_{i+1} = prox(w_i − η_i∇_w ĝ(w_i, λ, ξ_i), λ, η_i)``.

    The inner solver NSID is fed with.  For a μ-strongly convex, L-smooth ``g`` take
    ``step_size = DecreasingStep(2/μ, 2L/μ)`` (``η_0 = 1/L``, ``E‖w_t − w(λ)‖² = O(1/t)``).
    Returns ``(w_t, samples)`` — ``w_t`` detached, ``samples`` the number of examples
    drawn (the leading dimension of each batch's first tensor).
    """
    _check_count(steps, "steps")
    eta = _steps_fn(step_size, "step_size")
    w, wspec = _leaves(params0, "params0")
    lam, lspec = _leaves(hparams, "hparams")
    w = [t.detach() for t in w]
    lam = [t.detach() for t in lam]
    _check_input_finite(w, "params0")
    _check_input_finite(lam, "hparams")
    def loss(wl: Leaves, ll: Leaves, b: Any) -> torch.Tensor:
        p, h = T.tree_unflatten(list(wl), wspec), T.tree_unflatten(list(ll), lspec)
        return _scalar(batch_loss(p, h, b), "batch_loss")

    grad_w = grad(loss)
    prox_l = _map_leaves(lambda u, h, e: prox(u, h, e), wspec, lspec, "prox")
    samples = 0
    stream = _batch_stream(batches, steps)
    for i in range(steps):
        e = float(eta(i))
        if not (math.isfinite(e) and e > 0):
            raise ValueError(f"step_size({i}) = {e!r}; step sizes should be finite and > 0.")
        batch = next(stream)
        samples += _batch_size(batch)
        with torch.no_grad():
            w = prox_l(T.axpy(-e, grad_w(w, lam, batch), w), lam, e)
        if (i + 1) % 100 == 0 or i + 1 == steps:  # a host sync, so only now and then
            try:
                check_finite(w, "stochastic_proximal_gradient's iterate")
            except SolverError as err:
                raise NotContractionError(
                    f"stochastic_proximal_gradient diverged (NaN/Inf after {i + 1} steps): lower "
                    "the step size (η_i must stay < 2/L for each batch loss's gradient) or check "
                    "the data."
                ) from err
    return T.tree_unflatten(w, wspec), samples


@dataclass(frozen=True)
class NSIDInfo:
    """What :func:`nsid` did.

    ``steps``: stochastic linear-system iterations; ``samples``: examples drawn for them
    (``mean_batch`` not included; ``mean_samples`` is its size); ``q``: the contraction
    factor used for the default step sizes (``None`` if ``step_size`` was given);
    ``inner_residual``: ``‖G(T̂(w, λ, mean_batch), λ) − w‖``; ``v``: the final linear-system
    iterate, shaped like ``params`` (pass as ``init=`` to warm-start).
    """

    steps: int
    samples: int
    mean_samples: int
    q: float | None
    inner_residual: float
    outer_loss: float
    v: Any


def nsid(
    outer_loss: Callable[[Any, Any], torch.Tensor],
    params: Any,
    hparams: Any,
    *,
    fixed_point: CompositeMap,
    batches: Iterable[Any],
    mean_batch: Any,
    steps: int,
    step_size: DecreasingStep | Callable[[int], float] | None = None,
    init: Any = None,
    return_info: bool = False,
) -> Any:
    """NSID: stochastic implicit differentiation of a nonsmooth composite fixed point.

    For ``w(λ) = G(T(w(λ), λ), λ)`` with ``T = E_ξ T̂(·, ·, ξ)`` (Grazzi, Pontil & Salzo,
    ICML 2024), at ``w = params`` (an approximation of ``w(λ)``, e.g. from
    :func:`stochastic_proximal_gradient`):

    1. ``w̄ = T̂(w, λ, mean_batch)`` — one estimate of ``T(w, λ)`` where the Jacobians of
       ``G`` are taken (pass the full data or a large batch);
    2. ``v_{i+1} = (1 − η_i) v_i + η_i (∂_wT̂(w, λ, ξ_i)ᵀ ∂_uG(w̄, λ)ᵀ v_i + ∇_w f)``,
       ``i < steps``, one fresh batch ``ξ_i`` from ``batches`` per step;
    3. returns ``∇_λ f + (∂_λ[G(T̂(w, λ, mean_batch), λ)])ᵀ v_k``, shaped like ``hparams``.

    ``step_size`` defaults to ``DecreasingStep.for_contraction(q)`` with ``q`` the norm of
    ``∂_wΦ`` at ``w`` estimated by power iteration on the ``mean_batch`` map.  With exact
    ``w`` the mean squared error is ``O(1/k)``; with ``batches`` all equal to the full data
    and ``η_i = 1`` it is AID with fixed-point iterations.  Raises ``ValueError`` for bad
    input and :class:`~bilevel.SolverError` for NaN/Inf.
    """
    if not isinstance(fixed_point, CompositeMap):
        raise TypeError(
            "nsid: fixed_point should be a CompositeMap(inner, outer) (see "
            "proximal_gradient_composite); for a map you can evaluate exactly use "
            f"bilevel.hypergrad(fixed_point=...). Got {type(fixed_point).__name__}."
        )
    _check_count(steps, "steps")
    w, wspec = _leaves(params, "params")
    lam, lspec = _leaves(hparams, "hparams")
    dtypes = {t.dtype for t in w + lam}
    if len(dtypes) > 1:
        raise TypeError(
            f"params and hparams should share one dtype, got {sorted(map(str, dtypes))}: "
            "cast them with .to(torch.float64) (or float32)."
        )
    w = [t.detach() for t in w]
    lam = [t.detach() for t in lam]
    _check_input_finite(w, "params")
    _check_input_finite(lam, "hparams")

    f = _tree_fn(outer_loss, wspec, lspec)
    fval, f_vjp = vjp(lambda wl, ll: _scalar(f(wl, ll), "outer_loss"), w, lam)
    gw, gl = f_vjp(torch.ones_like(fval))
    check_finite(gw, "∇_w outer_loss")

    inner = _map_leaves(fixed_point.inner, wspec, lspec, "CompositeMap.inner")
    outer = _map_leaves(fixed_point.outer, wspec, lspec, "CompositeMap.outer")
    # w̄ = T̂(w, λ, mean_batch) and the pullbacks of G at (w̄, λ): built once, reused k times.
    wbar, inner_lam_vjp = vjp(lambda ll: inner(w, ll, mean_batch), lam)
    wbar = [t.detach() for t in wbar]
    check_finite(wbar, "T̂(params, hparams, mean_batch)")
    phi_bar, outer_vjp = vjp(outer, wbar, lam)
    inner_residual = T.norm(T.sub(phi_bar, w))

    def outer_t(v: Leaves) -> Leaves:  # ∂_uG(w̄, λ)ᵀ v
        return list(outer_vjp(v)[0])

    q = None
    if step_size is None:
        q = _composite_norm(lambda wl: outer(inner(wl, lam, mean_batch), lam), w)
        if not q < 1:
            raise ValueError(
                f"nsid: the map is not a contraction at params (‖∂_wΦ‖ ≈ {q:.4g} ≥ 1), so "
                "the default step sizes do not apply; lower the step inside the map, or "
                "pass step_size= if you know better."
            )
        step_size = DecreasingStep.for_contraction(q)
    eta = _steps_fn(step_size, "step_size")

    if init is None:
        v = T.zeros_like(w)
    else:
        v, ispec = T.tree_flatten(init)
        if ispec != wspec or any(a.shape != b.shape for a, b in zip(v, w)):
            raise ValueError(f"init should be shaped like params, got {T.describe(init)}.")
        v = [t.detach() for t in v]
    samples = 0
    stream = _batch_stream(batches, steps)
    for i in range(steps):
        e = float(eta(i))
        if not (math.isfinite(e) and 0 < e <= 1):
            raise ValueError(
                f"nsid: step_size({i}) = {e!r}; NSID's step sizes are averaging weights and "
                "should lie in (0, 1] (DecreasingStep(beta, gamma) with gamma >= beta)."
            )
        batch = next(stream)
        samples += _batch_size(batch)
        _, inner_w_vjp = vjp(lambda wl, b=batch: inner(wl, lam, b), w)
        jv = list(inner_w_vjp(outer_t(v))[0])
        v = [(1 - e) * vi + e * (ji + gi) for vi, ji, gi in zip(v, jv, gw)]
    check_finite(v, f"NSID's linear-system iterate after {steps} steps")

    g_u, g_lam = outer_vjp(v)
    hg = T.add(T.add(gl, list(g_lam)), list(inner_lam_vjp(list(g_u))[0]))
    check_finite(hg, "the hypergradient")
    _check_reached(hg, lspec, lambda: _unused(f, fixed_point, w, lam, wspec, lspec, mean_batch))
    out = T.tree_unflatten([t.detach() for t in hg], lspec)
    if not return_info:
        return out
    info = NSIDInfo(
        steps,
        samples,
        _batch_size(mean_batch),
        q,
        _item(inner_residual),
        _item(fval),
        T.tree_unflatten([t.detach() for t in v], wspec),
    )
    return out, info


def _composite_norm(phi: Callable[[Leaves], Leaves], w: Leaves, iters: int = 30) -> float:
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
    try:
        with torch.enable_grad():
            ll = [t.detach().requires_grad_() for t in lam]
            wl = [t.detach() for t in w]
            outs = [f(wl, ll)]
            p, h = T.tree_unflatten(wl, wspec), T.tree_unflatten(ll, lspec)
            outs += T.tree_flatten(fixed_point(p, h, mean_batch))[0]
            total = sum(o.sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
            if not isinstance(total, torch.Tensor):
                return list(range(len(lam)))
            grads = torch.autograd.grad(total, ll, allow_unused=True)
        return [i for i, d in enumerate(grads) if d is None]
    except RuntimeError:
        return []

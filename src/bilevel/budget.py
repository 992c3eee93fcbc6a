"""Automatic budgets: a hypergradient within a requested accuracy, inner iterations included.

:func:`hypergrad_within` runs the inner iteration ``w ← inner_step(w, λ)`` and
:func:`bilevel.hypergrad` (``tol=``) together, paying for as few a-posteriori estimates
(:mod:`bilevel.error`, 13–31 products each) as it can:

1. a first chunk of inner steps, then a *probe*: a short linear solve (at most
   :data:`_PROBE_ITERATIONS` iterations) and one estimate, which splits the error into its
   inner and linear-system parts;
2. *calibration*: once one mode dominates a linearly convergent iteration, the inner error
   and the step length ``s_t = ‖w_{t+1} − w_t‖`` both shrink like ``‖w_t − w*‖``, so their
   ratio ``k = inner / s_t`` stays put.  Inner steps run until ``k·s_t`` is at most the
   inner part's share of ``tol`` (half of it), judged from the step lengths alone (free: no
   estimate), in chunks sized from the measured decay of ``s_t``;
3. a final :func:`bilevel.hypergrad` with ``tol=`` (the linear part to what is left of
   ``tol``, warm-started from the probe's ``v``), whose estimate checks the whole; if the
   inner part is still above its share (the ratio drifted), ``k`` is re-measured and step 2
   resumes.

Warm-startable across outer steps: pass the returned ``params`` and ``info.v`` back in
(``init=``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from bilevel import _tree as T
from bilevel._checks import (
    ConvergenceWarning,
    check_count,
    check_not_diverging,
    check_one_form,
    check_positive,
    check_shaped_like,
    warn_error_above,
    worst,
)
from bilevel.ift import HypergradInfo, hypergrad
from bilevel.linear_solve import CG, Solver

__all__ = ["hypergrad_within"]

Leaves = list[torch.Tensor]

_FIRST_INNER_CHUNK = 10
# the probe's linear solve: enough for v to be a few digits right (the inner part of the
# estimate depends on v to first order), not the full solve that only the final point needs
_PROBE_ITERATIONS = 8
_RATE_WINDOW = 20  # step lengths the decay rate is measured over


def iterate(step: Callable[[Any, Any], Any], w: Any, hparams: Any, n: int, what: str, fix: str) -> tuple[Any, Leaves]:
    """``n`` steps ``w ← step(w, λ)`` without a graph; returns the iterate and the step norms
    ``‖w_{t+1} − w_t‖`` (on the device), judged once at the end (:func:`check_not_diverging`:
    ``what`` names the iteration, ``fix`` says what to change)."""
    norms: Leaves = []
    flat, spec = T.tree_flatten(w)
    with torch.no_grad():
        for t in range(n):
            w = step(w, hparams)
            new, nspec = T.tree_flatten(w)
            if t == 0:  # a step's structure cannot change from one call to the next: checked once
                check_shaped_like(new, nspec, flat, spec, f"{what}: one step")
            norms.append(T.norm(T.sub(new, flat)))
            flat = new
    check_not_diverging(norms, flat, what, fix)
    return w, norms


def _inner_steps(inner_step: Callable[[Any, Any], Any], w: Any, hparams: Any, n: int) -> tuple[Any, Leaves]:
    return iterate(inner_step, w, hparams, n, "hypergrad_within: the inner iterations",
                   "inner_step should contract near the solution (a gradient step needs a step size < 2/L).")


def _steps_needed(k: torch.Tensor, norms: Leaves, target: float) -> int:
    """Inner steps until the predicted inner error ``k·s_t`` reaches ``target`` (0: already
    there), from the decay of the last step lengths (per vmap row; the most any row needs)."""
    pred = k * norms[-1]
    if worst(pred) <= target:
        return 0
    m = min(len(norms) - 1, _RATE_WINDOW)
    if m < 1:
        return 1
    tiny = torch.finfo(norms[-1].dtype).tiny  # a step of exactly 0 (converged) decays at rate 0, not NaN
    rate = (norms[-1].clamp(min=tiny) / norms[-1 - m].clamp(min=tiny)) ** (1.0 / m)
    need = torch.log(pred / target) / -torch.log(rate)
    need = torch.where((pred <= target) | (rate >= 1) | ~torch.isfinite(need), torch.full_like(need, -1.0), need)
    n = worst(need)
    if n < 0 and worst(pred) > target:  # no decay measured yet in some row: as many steps again
        return m
    return max(1, math.ceil(n))


def hypergrad_within(
    outer_loss: Callable[[Any, Any], torch.Tensor],
    params: Any,
    hparams: Any,
    *,
    tol: float,
    inner_step: Callable[[Any, Any], Any] | None = None,
    inner_loss: Callable[[Any, Any], torch.Tensor] | None = None,
    fixed_point: Callable[[Any, Any], Any] | None = None,
    solver: Solver = CG(),
    init: Any = None,
    max_inner: int = 10_000,
) -> tuple[Any, Any, HypergradInfo]:
    """A hypergradient whose estimated error ``‖ĝ − ∇F(λ)‖`` is at most ``tol``, paying only
    for the inner and linear-solver iterations that needs.

    ``params``: the starting inner iterate (the previous outer step's, for a warm start);
    ``inner_step(params, hparams)``: one step of a convergent inner iteration (e.g. a gradient
    step ``w − η ∇_w g``; default: ``fixed_point`` itself).  The hypergradient is taken in the
    form given (``inner_loss=`` or ``fixed_point=``, as in :func:`bilevel.hypergrad`, with
    ``solver``, warm-started from ``init``, e.g. ``info.v`` of the previous call).

    Returns ``(hypergrad, params, info)``: ``params`` the inner iterate reached (pass it back
    next time), ``info`` a :class:`~bilevel.HypergradInfo` whose ``inner_iterations`` counts
    the inner steps, ``iterations`` the linear-solver iterations and
    ``error.products`` the products the estimates cost, over all rounds.  Warns
    (:class:`~bilevel.ConvergenceWarning`) when ``max_inner`` steps or ``solver.maxiter``
    did not reach ``tol``.
    """
    check_positive("hypergrad_within: tol", tol)
    check_count("hypergrad_within: max_inner", max_inner)
    check_one_form(inner_loss, fixed_point)
    if inner_step is None:
        if fixed_point is None:
            raise ValueError("hypergrad_within needs inner_step= (one step of the inner iteration, e.g. "
                             "lambda w, lam: w - eta * grad_w inner_loss(w, lam)) when no fixed_point= is given.")
        inner_step = fixed_point
    target = 0.5 * tol  # the inner part's share of tol; the linear part gets the rest
    chunk = min(_FIRST_INNER_CHUNK, max_inner)
    w, norms = _inner_steps(inner_step, params, hparams, chunk)
    used, linear_its, products, v = chunk, 0, 0, init
    mode, rel = ("probe" if hasattr(solver, "maxiter") else "full"), 0.0
    while True:
        if mode == "probe":  # a short solve: enough for the estimate to split the error
            slv, kw = replace(solver, maxiter=min(solver.maxiter, _PROBE_ITERATIONS)), {"tol": tol}
        elif mode == "sized":  # the residual the calibration asks for, and one estimate to check it
            slv, kw = replace(solver, tol=rel), {"estimate": True}
        else:  # hypergrad(tol=): chunks of iterations, each judged by an estimate
            slv, kw = solver, {"tol": tol}
        with warnings.catch_warnings():  # judged once, below, for the final answer
            warnings.simplefilter("ignore", ConvergenceWarning)
            hg, info = hypergrad(outer_loss, w, hparams, inner_loss=inner_loss, fixed_point=fixed_point,
                                 solver=slv, init=v, return_info=True, inner_tol=math.inf, **kw)
        v = info.v
        linear_its += info.iterations
        err = info.error
        products += err.products
        total, inner = worst(torch.as_tensor(err.total)), worst(torch.as_tensor(err.inner))
        if total <= tol or used >= max_inner or not math.isfinite(total):
            break
        if inner <= target:
            if mode != "full":  # only the linear part is short: hypergrad(tol=) at this point
                mode = "full"
                continue
            break  # hypergrad(tol=) hit the solver's maxiter: warned below
        s = norms[-1]
        if not worst(s) > 0:  # at a fixed point already: more inner steps change nothing
            break
        # calibrate: the inner error per unit of step length (both ∝ ‖w − w*‖ in the linear regime)
        k = torch.as_tensor(err.inner, dtype=s.dtype, device=s.device) / s
        while used < max_inner:
            n = min(_steps_needed(k, norms, target), max_inner - used)
            if n == 0:
                break
            w, more = _inner_steps(inner_step, w, hparams, n)
            norms, used = norms[-_RATE_WINDOW:] + more, used + n
        # the linear part is ∝ the relative residual: ask the solver for the residual that
        # brings it to half of what the predicted inner part leaves of tol
        res, linear = worst(torch.as_tensor(info.residual)), worst(torch.as_tensor(err.linear))
        left = tol - min(worst(k * norms[-1]), target)
        mode = "sized" if hasattr(solver, "tol") and res > 0 and linear > 0 else "full"
        rel = min(res * 0.5 * left / linear, 0.5) if mode == "sized" else 0.0
    err = replace(err, products=products)
    info = replace(info, iterations=linear_its, inner_iterations=used, error=err)
    warn_error_above("hypergrad_within", err, tol, linear_its,
                     f"{used} inner steps (max_inner) left the inner error above tol: raise max_inner")
    return hg, w, info

"""Automatic budgets: a hypergradient within a requested accuracy, inner iterations included.

:func:`hypergrad_within` runs the inner iteration ``w ← inner_step(w, λ)`` and
:func:`bilevel.hypergrad` (``tol=``) together.  After each chunk of inner steps the
a-posteriori estimate (:mod:`bilevel.error`) splits the hypergradient error into its inner
and linear-system parts; the linear part is met by ``hypergrad(tol=)``, and the inner part
decides how many more inner steps to run: the inner error shrinks at a rate ``ρ`` per
step (the decay of the estimated inner error over the last chunk, when it decreased;
else, as after the first chunk, from the chunk's first and last step lengths
``‖w_{t+1} − w_t‖``), so
``log(inner/target)/log(1/ρ)`` more steps are expected to suffice.  Warm-startable across
outer steps: pass the returned ``params`` and ``info.v`` back in (``init=``).
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
    warn_error_above,
    worst,
)
from bilevel.ift import HypergradInfo, hypergrad
from bilevel.linear_solve import CG, Solver

__all__ = ["hypergrad_within"]

Leaves = list[torch.Tensor]

_FIRST_INNER_CHUNK = 10


def iterate(step: Callable[[Any, Any], Any], w: Any, hparams: Any, n: int, what: str, fix: str) -> tuple[Any, Leaves]:
    """``n`` steps ``w ← step(w, λ)`` without a graph; returns the iterate and the step norms
    ``‖w_{t+1} − w_t‖`` (on the device), judged once at the end (:func:`check_not_diverging`:
    ``what`` names the iteration, ``fix`` says what to change)."""
    norms: Leaves = []
    flat = T.tree_flatten(w)[0]
    with torch.no_grad():
        for _ in range(n):
            w = step(w, hparams)
            new = T.tree_flatten(w)[0]
            norms.append(T.norm(T.sub(new, flat)))
            flat = new
    check_not_diverging(norms, flat, what, fix)
    return w, norms


def _inner_steps(inner_step: Callable[[Any, Any], Any], w: Any, hparams: Any, n: int) -> tuple[Any, torch.Tensor]:
    """``n`` inner steps; returns the iterate and the per-step contraction ``ρ`` measured from
    the first and last step lengths (NaN when ``n < 2``)."""
    w, norms = iterate(inner_step, w, hparams, n, "hypergrad_within: the inner iterations",
                       "inner_step should contract near the solution (a gradient step needs a step size < 2/L).")
    if n < 2:
        return w, torch.tensor(math.nan)
    return w, (norms[-1] / norms[0]).clamp(min=1e-300) ** (1.0 / (n - 1))


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
    w, used, chunk, linear_its = params, 0, min(_FIRST_INNER_CHUNK, max_inner), 0
    v, products, prev_inner = init, 0, None
    target = 0.5 * tol  # the inner part's share of tol; the linear part gets the rest
    while True:
        w, rate = _inner_steps(inner_step, w, hparams, chunk)
        used += chunk
        with warnings.catch_warnings():  # judged once, below, for the final answer
            warnings.simplefilter("ignore", ConvergenceWarning)
            hg, info = hypergrad(outer_loss, w, hparams, inner_loss=inner_loss, fixed_point=fixed_point,
                                 solver=solver, init=v, tol=tol, return_info=True, inner_tol=math.inf)
        v = info.v
        linear_its += info.iterations
        err = info.error
        products += err.products
        total, inner = worst(torch.as_tensor(err.total)), worst(torch.as_tensor(err.inner))
        if total <= tol or used >= max_inner or not math.isfinite(total):
            break
        r = worst(rate)
        if prev_inner is not None and 0 < inner < prev_inner:
            # the rate of the estimated inner error itself over the last chunk: step-length
            # ratios over a short chunk see the fast modes and promise too much
            r = (inner / prev_inner) ** (1.0 / chunk)
        prev_inner = inner
        if inner <= target:  # only the linear part is short: hypergrad(tol=) hit maxiter
            break
        if math.isfinite(r) and 0 < r < 1:
            need = math.log(inner / target) / -math.log(r)
            chunk = max(1, math.ceil(1.2 * need))
        else:
            chunk = 2 * chunk
        chunk = min(chunk, max_inner - used)
    err = replace(err, products=products)
    info = replace(info, iterations=linear_its, inner_iterations=used, error=err)
    warn_error_above("hypergrad_within", err, tol, linear_its,
                     f"{used} inner steps (max_inner) left the inner error above tol: raise max_inner")
    return hg, w, info

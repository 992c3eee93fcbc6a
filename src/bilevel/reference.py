"""The error of a hypergradient computed by any method, judged against AID at the same point.

ITD (:func:`bilevel.unroll`, :func:`bilevel.forward_hypergrad`), a truncated Neumann series,
a peer library or a hand-written loop return a hypergradient ``ĝ`` at the inner iterate
``ŵ`` they reached, with no statement of its accuracy.  With ``ĝ_AID`` the AID
hypergradient at ``ŵ`` (:func:`bilevel.hypergrad`, ``estimate=True``) and ``E`` its
a-posteriori estimate (:mod:`bilevel.error`), the triangle inequality gives

    ‖ĝ − ∇F(λ)‖ ≤ ‖ĝ − ĝ_AID‖ + ‖ĝ_AID − ∇F(λ)‖ ≈ ‖ĝ − ĝ_AID‖ + E,

the first term measured, the second estimated (inner part: the distance from ``ŵ`` to
``w(λ)``; linear part: AID's own solve).  For ITD, ``ĝ − ĝ_AID`` is what truncating the
unrolled sum costs at ``ŵ`` (``O(q^T)`` for a q-contraction; Grazzi et al., ICML 2020), and
``E``'s inner part what stopping the inner iteration early costs.  As with every estimate
here: an estimate of an upper bound, not a guarantee.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from bilevel import _tree as T
from bilevel._checks import check_input_finite, check_shaped_like, info_number, leaves
from bilevel.error import ErrorEstimate
from bilevel.ift import hypergrad
from bilevel.linear_solve import CG, GMRES, Solver

__all__ = ["hypergrad_error"]


def hypergrad_error(
    hypergradient: Any,
    outer_loss: Callable[[Any, Any], torch.Tensor],
    params: Any,
    hparams: Any,
    *,
    inner_loss: Callable[[Any, Any], torch.Tensor] | None = None,
    fixed_point: Callable[[Any, Any], Any] | None = None,
    solver: Solver | None = None,
) -> ErrorEstimate:
    """Estimate ``‖ĝ − ∇F(λ)‖`` for a hypergradient ``ĝ`` (``hypergradient``, shaped like
    ``hparams``) that some method computed at the inner iterate ``params``.

    ``‖ĝ − ĝ_AID‖ + E``: ``ĝ_AID`` the AID hypergradient at ``params`` in the form given
    (``inner_loss=`` or ``fixed_point=``, as for :func:`bilevel.hypergrad`, with ``solver``:
    default ``CG()``, or ``GMRES()`` for a ``fixed_point``) and ``E`` its a-posteriori
    estimate.  For ITD through :func:`bilevel.unroll`, ``params`` is the unrolled ``w_T``
    (detached) and the form is ``fixed_point=step`` (the step map), or the ``inner_loss``
    that a gradient step descends.

    Returns an :class:`~bilevel.ErrorEstimate`: ``total`` the estimate, ``inner`` and
    ``inner_distance`` AID's inner part, ``linear`` the rest (``‖ĝ − ĝ_AID‖`` + AID's
    linear part), ``products`` what the AID solve and its estimate cost (the solver's
    iterations included).  Warns like :func:`bilevel.hypergrad` when AID's own solve
    missed its tolerance.
    """
    if solver is None:
        solver = CG() if inner_loss is not None else GMRES()
    lam, lspec = leaves(hparams, "hparams")
    g_leaves, g_spec = T.tree_flatten(hypergradient)
    check_shaped_like(g_leaves, g_spec, lam, lspec, "hypergrad_error: the hypergradient", like="hparams",
                      verb="should be")
    check_input_finite(g_leaves, "hypergrad_error: the hypergradient")
    ref, info = hypergrad(outer_loss, params, hparams, inner_loss=inner_loss, fixed_point=fixed_point,
                          solver=solver, return_info=True, estimate=True, inner_tol=float("inf"))
    diff = T.norm([g.detach() - r for g, r in zip(g_leaves, T.tree_flatten(ref)[0], strict=True)])
    err = info.error
    linear = torch.as_tensor(err.linear, dtype=diff.dtype, device=diff.device) + diff
    total = torch.as_tensor(err.inner, dtype=diff.dtype, device=diff.device) + linear
    return replace(err, total=info_number(total), linear=info_number(linear),
                   products=err.products + info.iterations)

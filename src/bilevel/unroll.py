"""Iterative differentiation (ITD): differentiate through T steps of the inner solver.

``w_{t+1} = step(w_t, λ)`` (or ``step(w_t, λ, t)`` with ``indexed=True``), ``t < T``.

* :func:`unroll` returns ``w_T`` with its autograd graph to ``λ`` (reverse mode); with
  ``truncate=K`` only the last K steps are recorded (memory independent of T), with
  ``checkpoint=True`` the graph is kept at O(√T) memory by recomputation.
* :func:`forward_hypergrad` carries ``Z_t = dw_t/dλ`` forward (Franceschi et al., ICML
  2017, "forward-mode" FMD): memory O(|w|·|λ|) for any T, cheap when λ is small.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.func import jvp, vjp, vmap

from bilevel import _tree as T
from bilevel._checks import check_autograd, check_input_finite, check_shaped_like, leaves, scalar

__all__ = ["unroll", "forward_hypergrad"]

Leaves = list[torch.Tensor]


def _check_steps(steps: int, truncate: int | None) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps should be an int >= 0, not {steps!r}.")
    if truncate is not None and (
        not isinstance(truncate, int) or isinstance(truncate, bool) or not 0 <= truncate <= steps
    ):
        raise ValueError(f"truncate should be None or an int in [0, steps={steps}], not {truncate!r}.")


def _stepleaves(step: Callable[..., Any], wspec: Any, lspec: Any, indexed: bool):
    """step as a function of leaves, checking the output structure once."""
    checked = [False]

    def fn(w: Leaves, lam: Leaves, t: int) -> Leaves:
        args = (T.tree_unflatten(list(w), wspec), T.tree_unflatten(list(lam), lspec))
        out, ospec = T.tree_flatten(step(*args, t) if indexed else step(*args))
        if not checked[0]:
            check_shaped_like(out, ospec, w, wspec, "step(params, hparams)")
            checked[0] = True
        return out

    return fn


def _segment_run(fn: Callable[[Leaves, Leaves, int], Leaves], t0: int, t1: int):
    """Steps ``t0 ≤ t < t1`` as a function of the flat inputs ``(*w_t0, *λ)``; with
    ``record=False`` each step's graph is dropped as soon as the step is done."""

    def run(flat: Leaves, n_w: int, record: bool) -> Leaves:
        w, lam = list(flat[:n_w]), list(flat[n_w:])
        for t in range(t0, t1):
            w = fn(w, lam, t)
            if not record:  # keep requires_grad as in a recorded unroll: the next step may differentiate
                w = [x.detach().requires_grad_(x.requires_grad) for x in w]
        return w

    return run


class _Segment(torch.autograd.Function):
    """One checkpointed segment ``w_t1 = Φ_{t1−1}∘…∘Φ_t0(w_t0, λ)``.

    The forward pass runs the steps without keeping their graph and saves only the inputs
    ``(w_t0, λ)``; the backward pass recomputes the segment with a graph and returns
    ``(∂w_t1/∂w_t0)ᵀḡ, (∂w_t1/∂λ)ᵀḡ``.  With √T segments of √T steps the memory is
    √T stored states plus one segment's graph.  Written by hand rather than with
    ``torch.utils.checkpoint``: its non-reentrant form records through saved-tensor
    hooks, which ``torch.func.grad`` inside a step refuses, and its reentrant form
    refuses ``torch.autograd.grad``.
    """

    @staticmethod
    def forward(run: Callable[..., Leaves], n_w: int, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # grad mode on, as in a recorded unroll, for steps that call torch.autograd.grad
        # (w.r.t. w_t); each step's graph is freed when the step is done
        with torch.enable_grad():
            out = run(list(flat), n_w, record=False)
        return tuple(o.detach() for o in out)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        # separate from forward so that torch.func.grad can differentiate an unroll
        ctx.run, ctx.n_w = inputs[0], inputs[1]
        ctx.save_for_backward(*inputs[2:])

    @staticmethod
    def backward(ctx: Any, *grad_out: torch.Tensor):
        flat = ctx.saved_tensors
        wanted = ctx.needs_input_grad[2:]
        # backward(create_graph=True) (and torch.func.grad): differentiate at aliases of the
        # inputs, so the graph of the result stays connected to them for higher derivatives;
        # differentiating at the inputs themselves would also follow w_t0's own history to λ
        # and count that path twice.  Otherwise fresh leaves: nothing outside is kept alive.
        create = torch.is_grad_enabled()
        if create:
            inputs = [x.view_as(x) if need else x.detach() for x, need in zip(flat, wanted)]
        else:
            inputs = [x.detach().requires_grad_(need) for x, need in zip(flat, wanted)]
        with torch.enable_grad():
            out = ctx.run(inputs, ctx.n_w, record=True)
        pairs = [(o, g) for o, g in zip(out, grad_out) if o.requires_grad]
        targets = [x for x, need in zip(inputs, wanted) if need]
        grads = iter(
            torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs],
                                allow_unused=True, create_graph=create)
            if pairs and targets else [None] * len(targets)
        )
        return (None, None, *(next(grads) if need else None for need in wanted))


def unroll(
    step: Callable[..., Any],
    params0: Any,
    hparams: Any,
    steps: int,
    *,
    truncate: int | None = None,
    checkpoint: bool = False,
    indexed: bool = False,
) -> Any:
    """Run ``w_{t+1} = step(w_t, hparams)`` for ``steps`` steps and return ``w_T``.

    ``w_T`` is differentiable w.r.t. ``hparams`` (and ``params0``) by reverse mode
    (ITD): call ``.backward()`` on a loss of it, or use it inside ``torch.func.grad``.
    ``truncate=K`` records only the last K steps (K-step truncated back-propagation;
    memory independent of ``steps``); ``checkpoint=True`` recomputes segments of √T steps
    in the backward pass instead of storing them (memory O(√T·|w|)).  With
    ``indexed=True`` the step is called as ``step(w_t, hparams, t)`` (schedules).
    """
    _check_steps(steps, truncate)
    check_autograd("unroll")
    w, wspec = leaves(params0, "params0")
    lam, lspec = leaves(hparams, "hparams")
    fn = _stepleaves(step, wspec, lspec, indexed)
    start = 0
    if truncate is not None:
        start = steps - truncate
        with torch.no_grad():
            lam_d = [t.detach() for t in lam]
            w = [t.detach() for t in w]
            for t in range(start):
                w = fn(w, lam_d, t)
    if checkpoint and steps - start > 1 and torch.is_grad_enabled():
        seg = max(1, math.isqrt(steps - start - 1) + 1)
        for t0 in range(start, steps, seg):
            w = _Segment.apply(_segment_run(fn, t0, min(t0 + seg, steps)), len(w), *w, *lam)
    else:
        for t in range(start, steps):
            w = fn(w, lam, t)
    return T.tree_unflatten(list(w), wspec)


def forward_hypergrad(
    outer_loss: Callable[[Any, Any], torch.Tensor],
    step: Callable[..., Any],
    params0: Any,
    hparams: Any,
    steps: int,
    *,
    indexed: bool = False,
    return_params: bool = False,
) -> Any:
    """Hypergradient of ``f(w_T, λ)`` through T steps by forward mode (FMD).

    Carries ``Z_{t+1} = ∂_wΦ Z_t + ∂_λΦ`` (``Z_0 = 0``, all |λ| directions at once with
    ``vmap`` over ``jvp``) and returns ``∇_λ f + Z_Tᵀ ∇_w f`` shaped like ``hparams``;
    with ``return_params=True`` returns ``(hypergrad, w_T)``.  Equal to reverse-mode ITD
    through :func:`unroll`; memory O(|w|·|λ|) independent of T, so use it when λ is small.
    """
    _check_steps(steps, None)
    check_autograd("forward_hypergrad")
    w, wspec = leaves(params0, "params0")
    lam, lspec = leaves(hparams, "hparams")
    w = [t.detach() for t in w]
    lam = [t.detach() for t in lam]
    check_input_finite(lam, "hparams")
    fn = _stepleaves(step, wspec, lspec, indexed)
    sizes = [t.numel() for t in lam]
    m = sum(sizes)
    eye = torch.eye(m, dtype=lam[0].dtype, device=lam[0].device)
    e_lam = [c.reshape(m, *t.shape) for c, t in zip(torch.split(eye, sizes, dim=1), lam)]
    z = [torch.zeros(m, *t.shape, dtype=t.dtype, device=t.device) for t in w]
    for t in range(steps):

        def tangent(zw: Leaves, zl: Leaves, t: int = t, w: Leaves = w) -> tuple[Leaves, Leaves]:
            return jvp(lambda wl, ll: fn(wl, ll, t), (w, lam), (zw, zl))

        w_b, z = vmap(tangent)(z, e_lam)
        w = [x[0] for x in w_b]
    f = lambda wl, ll: scalar(  # noqa: E731
        outer_loss(T.tree_unflatten(list(wl), wspec), T.tree_unflatten(list(ll), lspec)),
        "outer_loss",
    )
    fval, f_vjp = vjp(f, w, lam)
    gw, gl = f_vjp(torch.ones_like(fval))
    total = sum(zi.reshape(m, -1) @ gi.reshape(-1) for zi, gi in zip(z, gw))
    hg = [g + c.reshape(g.shape) for g, c in zip(gl, torch.split(total, sizes))]
    out = T.tree_unflatten(hg, lspec)
    return (out, T.tree_unflatten(w, wspec)) if return_params else out

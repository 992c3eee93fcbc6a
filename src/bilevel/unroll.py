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
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import jvp, vjp, vmap

from bilevel import _rng
from bilevel import _tree as T
from bilevel._checks import (
    active_transforms,
    check_autograd,
    check_count,
    check_finite,
    check_input_finite,
    check_reached,
    check_shaped_like,
    differentiable,
    eager,
    leaves,
    no_transform,
    scalar,
    unreached,
)

__all__ = ["unroll", "forward_hypergrad"]

Leaves = list[torch.Tensor]


# transforms under which the checkpointed autograd.Function cannot run (it has no vmap or
# forward-mode rule): there the plain recorded unroll is used
_FORWARD_TRANSFORMS = frozenset({"Vmap", "Jvp"})


def _check_steps(steps: int, truncate: int | None) -> None:
    if steps == 0 and not isinstance(steps, bool):
        raise ValueError(
            "steps=0: w_T would be params0 itself, so there is no path from hparams to w_T "
            "(every hypergradient would be zero). steps should be an int >= 1."
        )
    check_count("steps", steps, 1)
    if truncate == 0 and not isinstance(truncate, bool):
        raise ValueError(
            "truncate=0 records no step, so there is no path from hparams to w_T (every "
            f"hypergradient would be zero). truncate should be None (all steps) or an int in "
            f"[1, steps={steps}]."
        )
    if truncate is not None and (check_count("truncate", truncate, 1) > steps):
        raise ValueError(f"truncate should be None or an int in [1, steps={steps}], not {truncate!r}.")


def _stepleaves(step: Callable[..., Any], wspec: Any, lspec: Any, indexed: bool):
    """step as a function of leaves; every step's output is checked (structure, shapes and
    dtypes: metadata only, no data read) against ``params``."""
    what = "step(params, hparams, t)" if indexed else "step(params, hparams)"

    def fn(w: Leaves, lam: Leaves, t: int) -> Leaves:
        args = (T.tree_unflatten(list(w), wspec), T.tree_unflatten(list(lam), lspec))
        out, ospec = T.tree_flatten(step(*args, t) if indexed else step(*args))
        check_shaped_like(out, ospec, w, wspec, f"{what} at step t={t}")
        return out

    return fn


def _not_connected(what: str) -> ValueError:
    return ValueError(
        f"{what} output does not depend on hparams through autograd: it detaches or uses "
        ".data/.item()/no_grad (or ignores hparams), so every derivative of w_T w.r.t. "
        "hparams would be zero. Write the step with differentiable torch operations on "
        "params and hparams."
    )


# ----------------------------------------------------------------------------- RNG


# ----------------------------------------------------------------------------- checkpointing


class _SegmentRun:
    """Steps ``t0 ≤ t < t1`` as a function of the flat inputs ``(*w_t0, *λ)``; with
    ``record=False`` each step's graph is dropped as soon as the step is done.  Holds the
    random generators' state at the start of the segment (replayed by the recomputation).
    ``in_rg``: which leaves of ``w_t0`` require grad in a plain recorded unroll (the
    forward pass starts from them so, not from the segment outputs, which always do);
    after the forward pass ``out_rg`` says the same of ``w_t1``."""

    def __init__(self, fn: Callable[[Leaves, Leaves, int], Leaves], t0: int, t1: int, rng: Any,
                 in_rg: list[bool] | None) -> None:
        self.fn, self.t0, self.t1, self.rng, self.in_rg = fn, t0, t1, rng, in_rg
        self.out_rg: list[bool] = []

    def __call__(self, flat: Leaves, n_w: int, record: bool) -> Leaves:
        w, lam = list(flat[:n_w]), list(flat[n_w:])
        if not record and self.in_rg is not None:
            w = [x.detach().requires_grad_(r) for x, r in zip(w, self.in_rg)]
        for t in range(self.t0, self.t1):
            w = self.fn(w, lam, t)
            if not record:  # keep requires_grad as in a recorded unroll: the next step may differentiate
                w = [x.detach().requires_grad_(x.requires_grad) for x in w]
        if not record:
            self.out_rg = [x.requires_grad for x in w]
        return w


class _Segment(torch.autograd.Function):
    """One checkpointed segment ``w_t1 = Φ_{t1−1}∘…∘Φ_t0(w_t0, λ)``.

    The forward pass runs the steps without keeping their graph and saves only the inputs
    ``(w_t0, λ)``; the backward pass recomputes the segment with a graph — replaying the
    random generators' state of the forward pass, so minibatch sampling and dropout draw
    the same numbers — and returns ``(∂w_t1/∂w_t0)ᵀḡ, (∂w_t1/∂λ)ᵀḡ``.  With √T segments
    of √T steps the memory is √T stored states plus one segment's graph.  Written by hand
    rather than with ``torch.utils.checkpoint``: its non-reentrant form records through
    saved-tensor hooks, which ``torch.func.grad`` inside a step refuses, and its reentrant
    form refuses ``torch.autograd.grad``.
    """

    @staticmethod
    def forward(run: _SegmentRun, n_w: int, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
        with _rng.replayed(ctx.run.rng):
            if no_transform():
                grads = _Segment._autograd_vjp(ctx, flat, wanted, grad_out)
            else:
                try:
                    grads = _Segment._func_vjp(ctx, flat, wanted, grad_out)
                except RuntimeError as e:
                    if "randomness" not in str(e):
                        raise
                    raise ValueError(
                        "unroll(checkpoint=True): the step draws random numbers, and this "
                        "backward pass runs under vmap (torch.func.jacrev, or a vectorized "
                        "jacobian), which refuses to recompute a random step. Use "
                        "checkpoint=False there (the plain unroll records the draws), or "
                        "torch.func.grad / one backward pass per output."
                    ) from e
        return (None, None, *(next(grads) if need else None for need in wanted))

    @staticmethod
    def _autograd_vjp(ctx: Any, flat: Any, wanted: Any, grad_out: Any) -> Iterator[Any]:
        # backward(create_graph=True): differentiate at aliases of the inputs, so the graph
        # of the result stays connected to them for higher derivatives; differentiating at
        # the inputs themselves would also follow w_t0's own history to λ and count that
        # path twice.  Otherwise fresh leaves: nothing outside is kept alive.
        create = torch.is_grad_enabled()
        if create:
            inputs = [x.view_as(x) if need else x.detach() for x, need in zip(flat, wanted)]
        else:
            inputs = [x.detach().requires_grad_(need) for x, need in zip(flat, wanted)]
        with torch.enable_grad():
            out = ctx.run(inputs, ctx.n_w, record=True)
        pairs = [(o, g) for o, g in zip(out, grad_out) if o.requires_grad]
        targets = [x for x, need in zip(inputs, wanted) if need]
        return iter(
            torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs],
                                allow_unused=True, create_graph=create)
            if pairs and targets else [None] * len(targets)
        )

    @staticmethod
    def _func_vjp(ctx: Any, flat: Any, wanted: Any, grad_out: Any) -> Iterator[Any]:
        # under a torch.func transform (torch.func.grad, and jacrev, which runs this backward
        # under vmap with batched cotangents): a torch.func.vjp of the recomputed segment,
        # which composes with the transforms (torch.autograd.grad there would see the
        # batched cotangents as unrelated tensors and return None)
        idx = [i for i, need in enumerate(wanted) if need]

        def seg(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            inputs = list(flat)
            for i, x in zip(idx, xs):
                inputs[i] = x
            return tuple(ctx.run(inputs, ctx.n_w, record=True))

        _, f_vjp = vjp(seg, *(flat[i] for i in idx))
        return iter(f_vjp(tuple(grad_out)))


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
    (ITD): call ``.backward()`` on a loss of it, or use it inside ``torch.func.grad`` /
    ``jacrev`` / ``hessian`` / ``vmap``.  ``truncate=K`` (``1 ≤ K ≤ steps``) records only
    the last K steps (K-step truncated back-propagation; memory independent of ``steps``);
    ``checkpoint=True`` recomputes segments of √T steps in the backward pass instead of
    storing them (memory O(√T·|w|)), replaying the CPU (and, when CUDA is initialised, the
    inputs' CUDA) random generators' state of the forward pass, so a step that samples a
    minibatch or uses dropout gets the same draws and the exact gradient of the forward
    pass (a ``torch.Generator`` the step holds itself is not replayed).  Checkpointing is
    a memory optimisation only: under ``torch.func.vmap`` and forward mode (``jvp``,
    ``jacfwd``, ``hessian``) it is not applied and the plain recorded unroll runs.  With
    ``indexed=True`` the step is called as ``step(w_t, hparams, t)`` (schedules).

    Every step's output must have the structure, shapes and dtypes of ``params0``
    (``ValueError`` naming the step t otherwise).  With grad mode on, no torch.func
    transform active and an ``hparams`` leaf requiring grad, a ``w_T`` that does not
    require grad (the step detaches, uses ``.data``/``.item()``/``no_grad``) is a
    ``ValueError``: its derivatives would silently be zero.
    """
    _check_steps(steps, truncate)
    check_autograd("unroll")
    w, wspec = leaves(params0, "params0")
    lam, lspec = leaves(hparams, "hparams")
    fn = _stepleaves(step, wspec, lspec, indexed)
    what = "step(params, hparams, t)" if indexed else "step(params, hparams)"
    # a step that cuts autograd is caught where requires_grad means something: plain autograd
    must_connect = no_transform() and torch.is_grad_enabled() and any(t.requires_grad for t in lam)
    start = 0
    if truncate is not None:
        start = steps - truncate
        with torch.no_grad():
            lam_d = [t.detach() for t in lam]
            w = [t.detach() for t in w]
            for t in range(start):
                w = fn(w, lam_d, t)
    if (
        checkpoint
        and steps - start > 1
        and torch.is_grad_enabled()
        and not (_FORWARD_TRANSFORMS & active_transforms())
    ):
        seg = max(1, math.isqrt(steps - start - 1) + 1)
        rg: list[bool] | None = [t.requires_grad for t in w] if no_transform() else None
        for t0 in range(start, steps, seg):
            run = _SegmentRun(fn, t0, min(t0 + seg, steps), _rng.capture(w + lam), rg)
            w = list(_Segment.apply(run, len(w), *w, *lam))
            rg = run.out_rg if rg is not None else None
        if must_connect and not any(run.out_rg):
            raise _not_connected(what)
    else:
        for t in range(start, steps):
            w = fn(w, lam, t)
        if must_connect and not any(t.requires_grad for t in w):
            raise _not_connected(what)
    return T.tree_unflatten(list(w), wspec)


@eager  # under torch.compile: runs eagerly (a graph break), never mis-traced
def forward_hypergrad(
    outer_loss: Callable[[Any, Any], torch.Tensor],
    step: Callable[..., Any],
    params0: Any,
    hparams: Any,
    steps: int,
    *,
    indexed: bool = False,
    return_params: bool = False,
    create_graph: bool = False,
) -> Any:
    """Hypergradient of ``f(w_T, λ)`` through T steps by forward mode (FMD).

    Carries ``Z_{t+1} = ∂_wΦ Z_t + ∂_λΦ`` (``Z_0 = 0``, all |λ| directions at once with
    ``vmap`` over ``jvp``) and returns ``∇_λ f + Z_Tᵀ ∇_w f`` shaped like ``hparams``;
    with ``return_params=True`` returns ``(hypergrad, w_T)``.  Equal to reverse-mode ITD
    through :func:`unroll`; memory O(|w|·|λ|) independent of T, so use it when λ is small.

    A stochastic step (minibatch sampling, dropout) draws its random numbers once per step
    for all |λ| directions (``vmap(..., randomness="same")``): the result is the
    hypergradient of the one trajectory that :func:`unroll` runs from the same seed.  The
    result is detached, unless the caller differentiates it — under ``torch.func.grad`` /
    ``jacrev`` / ``jacfwd``, or with ``create_graph=True`` (plain autograd, inputs that
    require grad) — then its derivative is the Hessian of the unrolled outer loss (the
    graph holds all T steps).

    NaN/Inf in ``w_T`` or in the result raise :class:`~bilevel.SolverError`.  An ``hparams``
    leaf whose hypergradient is exactly zero because it reaches neither ``outer_loss`` nor
    the step raises ``ValueError`` naming it (found by calling ``outer_loss`` and the step
    once more at ``w_T`` — at every ``t`` with ``indexed=True`` — with the random
    generators' state restored afterwards: only then, when some leaf is exactly zero).
    """
    _check_steps(steps, None)
    check_autograd("forward_hypergrad")
    w, wspec = leaves(params0, "params0")
    lam, lspec = leaves(hparams, "hparams")
    keep_graph = differentiable(create_graph)
    if not keep_graph:  # nothing recorded: no graph of T steps kept alive by a Parameter
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

        # one trajectory: every tangent direction must see the same random draws
        w_b, z = vmap(tangent, randomness="same")(z, e_lam)
        w = [x[0] for x in w_b]
    f = lambda wl, ll: scalar(  # noqa: E731
        outer_loss(T.tree_unflatten(list(wl), wspec), T.tree_unflatten(list(ll), lspec)),
        "outer_loss",
    )
    what = "step(params, hparams, t)" if indexed else "step(params, hparams)"
    check_finite(w, f"w_T, the iterate after {steps} steps of {what}")  # every vmap row
    fval, f_vjp = vjp(f, w, lam)
    gw, gl = f_vjp(torch.ones_like(fval))
    total = sum(zi.reshape(m, -1) @ gi.reshape(-1) for zi, gi in zip(z, gw))
    hg = [g + c.reshape(g.shape) for g, c in zip(gl, torch.split(total, sizes))]
    check_finite(hg, "the forward-mode hypergradient")
    check_reached(hg, lspec, lambda: _unused_hparams(f, fn, w, lam, steps, indexed))
    out = T.tree_unflatten(hg, lspec)
    return (out, T.tree_unflatten(w, wspec)) if return_params else out


def _unused_hparams(
    f: Callable[[Leaves, Leaves], torch.Tensor],
    fn: Callable[[Leaves, Leaves, int], Leaves],
    w: Leaves,
    lam: Leaves,
    steps: int,
    indexed: bool,
) -> list[int]:
    """Indices of the hparams leaves with no autograd path to ``f(w_T, λ)`` nor to any step
    ``Φ(w_T, λ[, t])``: their forward-mode hypergradient is zero for a structural reason.

    Called only when a hypergradient leaf is exactly zero.  The step runs again at ``w_T``
    (with ``indexed=True`` at every ``t``, stopping once every leaf is reached: a schedule
    may use a leaf at one step only, so ``t = 0`` alone could misname it), replaying the
    random generators' state so that the caller's random stream is left as it was."""
    wd = [t.detach() for t in w]
    left = set(unreached(lambda ll: [f(wd, ll)], lam))
    with _rng.replayed(_rng.capture(wd + list(lam))):
        for t in range(steps if indexed else 1):
            if not left:
                break
            left &= set(unreached(lambda ll, t=t: fn(wd, ll, t), lam))
    return sorted(left)

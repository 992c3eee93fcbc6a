"""Bilevel solvers: outer loops of (projected, inexact) hypergradient descent.

Each solver is a frozen dataclass holding the problem's functions and its options, with

    state = solver.init(hparams)
    state, info = solver.step(state)          # one outer step; the loop is yours
    state, infos = solver.run(hparams, steps) # or all of them

and the update ``λ_{s+1} = P(λ_s − α_s ĝ_s)``, ``ĝ_s`` an estimate of ``∇F(λ_s)``, ``P`` the
optional ``projection`` (a callable on the hparams pytree, or a :class:`Box`), ``α_s`` from
``lr`` (a float, :class:`~bilevel.stochastic.ConstantStep` or
:class:`~bilevel.stochastic.DecreasingStep`).

* :class:`StochasticBilevel` — SID hypergradients (:func:`bilevel.sid`) from minibatches.
  ``warm_start=False`` is the method of Grazzi, Pontil, Salzo, "Bilevel Optimization with
  a Lower-level Contraction: Optimal Sample Complexity without Warm-start" (JMLR 2023):
  every outer step runs the (stochastic) fixed-point iterations from the same
  ``params0`` and the linear system from 0; with minibatches of size O(1/ε) and
  O(log 1/ε) inner/linear steps it reaches ``E‖∇F‖² ≤ ε`` with O(ε⁻²) samples (Õ for
  the log factors), the order of single-level SGD.  ``warm_start=True`` carries the inner
  iterate ``w`` and the linear iterate ``v`` across outer steps (AmIGO, Arbel & Mairal
  2022; stocBiO, Ji et al. 2021): few inner/linear steps per outer step.
* :class:`AIDBilevel` — deterministic reference: ``inner_steps`` full-batch fixed-point
  (gradient) steps, then :func:`bilevel.hypergrad` with a linear solver value.
* :class:`ITDBilevel` — deterministic reference: reverse mode through the inner steps
  (:func:`bilevel.unroll`).

Each step reports :class:`OuterInfo`: the hypergradient-estimate norm, inner and linear
residual estimates, the outer loss and the samples used.  Deterministic solvers count
``data_size`` samples per full-data evaluation of the map (default 1: evaluations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from bilevel import _tree as T
from bilevel._checks import (
    check_count,
    check_finite,
    check_not_diverging,
    check_one_form,
    check_positive,
    check_reached,
    item,
    leaves,
    scalar,
)
from bilevel.budget import hypergrad_within, iterate
from bilevel.ift import hypergrad
from bilevel.linear_solve import CG, FixedPoint, Solver, check_solver
from bilevel.reference import hypergrad_error
from bilevel.stochastic import (
    BatchStream,
    StepSize,
    as_step_size,
    as_stream,
    sid,
)
from bilevel.unroll import unroll

__all__ = ["Box", "OuterState", "OuterInfo", "StochasticBilevel", "AIDBilevel", "ITDBilevel"]

Leaves = list[torch.Tensor]


@dataclass(frozen=True)
class Box:
    """Projection onto ``{λ : lower ≤ λ ≤ upper}``, elementwise on every hparams leaf.

    ``lower``/``upper``: floats, or tensors broadcastable to every leaf (one-tensor hparams).
    For per-leaf boxes of a pytree pass a callable ``projection`` instead.
    """

    lower: float | torch.Tensor = -math.inf
    upper: float | torch.Tensor = math.inf

    def __post_init__(self) -> None:
        if not bool(torch.all(torch.as_tensor(self.lower) <= torch.as_tensor(self.upper))):
            raise ValueError(f"Box: lower should be <= upper, got lower={self.lower!r}, upper={self.upper!r}.")

    def __call__(self, hparams: Any) -> Any:
        def clamp(t: torch.Tensor) -> torch.Tensor:
            lo = self.lower if isinstance(self.lower, torch.Tensor) else torch.tensor(self.lower, dtype=t.dtype)
            hi = self.upper if isinstance(self.upper, torch.Tensor) else torch.tensor(self.upper, dtype=t.dtype)
            return torch.clamp(t, min=lo.to(t), max=hi.to(t))

        return T.tree_map(clamp, hparams)


@dataclass(frozen=True)
class OuterState:
    """The carry of an outer loop.

    ``hparams``: current λ; ``params``: the last inner iterate and ``v`` the last
    linear-system iterate (the starts of the next step when warm-starting); ``step``: outer
    steps taken; ``samples``: samples used so far; ``streams``: the (inner, outer)
    :class:`~bilevel.stochastic.BatchStream` of a stochastic solver (``None`` otherwise).
    """

    hparams: Any
    params: Any
    v: Any
    step: int
    samples: int
    streams: tuple[BatchStream, BatchStream] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class OuterInfo:
    """One outer step: ``step`` (index of the λ it was computed at), ``hypergrad_norm``
    (``‖ĝ_s‖``), ``inner_residual`` and ``linear_residual`` (estimates; ``nan`` where a
    method has no linear system), ``outer_loss`` (at ``w_s``), ``samples`` (this step) and
    ``total_samples`` (so far); ``hypergrad_error``: the estimated ``‖ĝ_s − ∇F(λ_s)‖``
    (:class:`AIDBilevel` with ``tol``, :class:`ITDBilevel` with ``estimate=True``; else ``None``)."""

    step: int
    hypergrad_norm: float
    inner_residual: float
    linear_residual: float
    outer_loss: float
    samples: int
    total_samples: int
    hypergrad_error: float | None = None


def _check_projection(projection: Any) -> None:
    if projection is not None and not callable(projection):
        raise TypeError(f"projection should be None, a Box(lower, upper) or a callable on hparams, not {projection!r}.")


def _descend(
    hparams: Any, hg: Any, lr: StepSize, s: int, projection: Callable[[Any], Any] | None
) -> Any:
    """λ − α_s ĝ, then the projection (checked to keep the structure of λ)."""
    lam, spec = T.tree_flatten(hparams)
    return _project(projection, T.tree_unflatten(T.axpy(-lr(s), T.tree_flatten(hg)[0], lam), spec))


def _project(projection: Callable[[Any], Any] | None, hparams: Any) -> Any:
    """P(λ), checked to keep the structure and shapes of λ."""
    if projection is None:
        return hparams
    lam, spec = T.tree_flatten(hparams)
    out = projection(hparams)
    leaves, ospec = T.tree_flatten(out)
    if ospec != spec or any(not isinstance(a, torch.Tensor) or a.shape != b.shape for a, b in zip(leaves, lam)):
        raise ValueError(
            f"projection(hparams) should return a pytree shaped like hparams ({T.describe(hparams)}), "
            f"got {T.describe(out)}."
        )
    return T.tree_unflatten([t.detach() for t in leaves], spec)


def _start(hparams: Any, params0: Any, projection: Any) -> Any:
    leaves(hparams, "hparams")
    leaves(params0, "params0")
    return _project(projection, T.tree_map(lambda t: t.detach().clone(), hparams))


class _Loop:
    """``run`` for every solver: ``steps`` calls of ``step`` after ``init``."""

    def init(self, hparams: Any) -> OuterState:  # pragma: no cover - overridden
        raise NotImplementedError

    def step(self, state: OuterState) -> tuple[OuterState, OuterInfo]:  # pragma: no cover
        raise NotImplementedError

    def run(self, hparams: Any, steps: int) -> tuple[OuterState, list[OuterInfo]]:
        """``init(hparams)`` then ``steps`` outer steps; returns the last state and every info."""
        check_count("steps", steps)
        state, infos = self.init(hparams), []
        for _ in range(steps):
            state, info = self.step(state)
            infos.append(info)
        return state, infos


class _DeterministicLoop(_Loop):
    """The checks and ``init`` that AIDBilevel and ITDBilevel share; each declares the
    fields (outer_loss, params0, fixed_point / inner_loss, lr, inner_steps,
    inner_step_size, projection, data_size)."""

    _least_inner_steps = 0

    def __post_init__(self: Any) -> None:
        check_one_form(self.inner_loss, self.fixed_point)
        check_count("inner_steps", self.inner_steps, self._least_inner_steps)
        check_count("data_size", self.data_size, 1)
        as_step_size(self.lr, "lr")
        check_positive("inner_step_size", self.inner_step_size)  # a float: the step of every inner iteration
        _check_projection(self.projection)

    def init(self: Any, hparams: Any) -> OuterState:
        return OuterState(_start(hparams, self.params0, self.projection), self.params0, None, 0, 0)


@dataclass(frozen=True)
class StochasticBilevel(_Loop):
    """Projected inexact hypergradient descent with SID hypergradients.

    Each step: ``ĝ_s = sid(...)`` at ``λ_s`` (``inner_steps`` stochastic fixed-point
    iterations, ``linear_steps`` on the linear system, λ-part over ``hparam_batches``
    batches), then ``λ_{s+1} = P(λ_s − α_s ĝ_s)``.  ``warm_start=False`` (JMLR 2023,
    Grazzi, Pontil, Salzo): the iterations start from ``params0`` and ``v = 0`` at every
    step.  ``warm_start=True``: from the previous step's ``w`` and ``v``.  The user
    functions take a batch: ``outer_loss(params, hparams, batch)`` and
    ``fixed_point(params, hparams, batch)`` or ``inner_loss(params, hparams, batch)``;
    ``batches``/``outer_batches`` as in :func:`bilevel.sid` (streams are opened by ``init``
    and carried in the state, so successive steps see successive batches).
    """

    outer_loss: Callable[[Any, Any, Any], torch.Tensor]
    params0: Any
    batches: Iterable[Any]
    fixed_point: Callable[[Any, Any, Any], Any] | None = None
    inner_loss: Callable[[Any, Any, Any], torch.Tensor] | None = None
    outer_batches: Iterable[Any] | None = None
    lr: StepSize | float = 0.1
    inner_steps: int = 10
    linear_steps: int = 10
    hparam_batches: int = 1
    inner_step_size: StepSize | float = 1.0
    linear_step_size: StepSize | float = 1.0
    warm_start: bool = False
    projection: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        check_one_form(self.inner_loss, self.fixed_point)
        check_count("inner_steps", self.inner_steps)
        check_count("linear_steps", self.linear_steps, 1)
        check_count("hparam_batches", self.hparam_batches, 1)
        for name in ("lr", "inner_step_size", "linear_step_size"):
            as_step_size(getattr(self, name), name)
        _check_projection(self.projection)

    def init(self, hparams: Any) -> OuterState:
        lam = _start(hparams, self.params0, self.projection)
        inner = as_stream(self.batches)
        outer = inner if self.outer_batches is None else as_stream(self.outer_batches)
        return OuterState(lam, self.params0, None, 0, 0, (inner, outer))

    def step(self, state: OuterState) -> tuple[OuterState, OuterInfo]:
        if state.streams is None:
            raise ValueError("this state has no data streams: create it with StochasticBilevel.init(hparams).")
        inner, outer = state.streams
        warm = self.warm_start and state.v is not None
        hg, info = sid(
            self.outer_loss,
            state.params if warm else self.params0,
            state.hparams,
            inner,
            fixed_point=self.fixed_point,
            inner_loss=self.inner_loss,
            outer_batches=outer,
            inner_steps=self.inner_steps,
            linear_steps=self.linear_steps,
            hparam_batches=self.hparam_batches,
            inner_step_size=self.inner_step_size,
            linear_step_size=self.linear_step_size,
            v0=state.v if warm else None,
            return_info=True,
        )
        lam = _descend(state.hparams, hg, as_step_size(self.lr, "lr"), state.step, self.projection)
        total = state.samples + info.samples
        out = OuterInfo(state.step, item(T.norm(T.tree_flatten(hg)[0])), float(info.inner_residual),
                        float(info.linear_residual), float(info.outer_loss), info.samples, total)
        return replace(state, hparams=lam, params=info.params, v=info.v, step=state.step + 1, samples=total), out


def _deterministic_inner(
    fixed_point: Callable[[Any, Any], Any] | None,
    inner_loss: Callable[[Any, Any], torch.Tensor] | None,
    eta: float,
) -> Callable[[Any, Any], Any]:
    """The full-batch inner step ``w + η(Φ(w, λ) − w)`` (or ``w − η ∇_w g(w, λ)``)."""
    if inner_loss is not None:
        grad_w = torch.func.grad(lambda w, lam: scalar(inner_loss(w, lam), "inner_loss"))
        return lambda w, lam: T.tree_map(lambda a, b: a - eta * b, w, grad_w(w, lam))
    if eta == 1.0:
        return fixed_point  # type: ignore[return-value]
    return lambda w, lam: T.tree_map(lambda a, b: a + eta * (b - a), w, fixed_point(w, lam))  # type: ignore[misc]


@dataclass(frozen=True)
class AIDBilevel(_DeterministicLoop):
    """Deterministic bilevel solver with AID hypergradients (reference for the stochastic ones).

    Each step: ``inner_steps`` full-batch steps ``w ← w + η(Φ(w, λ) − w)`` (or
    ``w ← w − η ∇_w g``, ``η = inner_step_size``) from ``params0`` (or from the previous
    ``w`` with ``warm_start=True``), then :func:`bilevel.hypergrad` with ``solver``
    (default: ``FixedPoint()`` for ``fixed_point``, ``CG()`` for ``inner_loss``; warm
    started from the previous ``v`` with ``warm_start=True``), then
    ``λ ← P(λ − α_s ∇F)``.  Functions take ``(params, hparams)`` as in the core.  Inner
    iterations that diverge (NaN/Inf, a blow-up, or step norms that clearly grow, as with an
    ``inner_step_size`` just above ``2/L``) raise :class:`~bilevel.NotContractionError`.

    With ``tol=ε`` (inexact hypergradient descent with automatic budgets): step ``s`` asks
    :func:`bilevel.hypergrad_within` for a hypergradient within ``ε_s = ε/√(s+1)`` (estimated
    error, reported as ``OuterInfo.hypergrad_error``), running as many inner steps (at most
    ``inner_steps``) and linear-solver iterations as that needs; ``warm_start=True`` makes
    later steps cheap.  Without ``tol`` no error estimate is computed (it is opt-in).
    """

    outer_loss: Callable[[Any, Any], torch.Tensor]
    params0: Any
    fixed_point: Callable[[Any, Any], Any] | None = None
    inner_loss: Callable[[Any, Any], torch.Tensor] | None = None
    lr: StepSize | float = 0.1
    inner_steps: int = 100
    inner_step_size: float = 1.0
    solver: Solver | None = None
    warm_start: bool = False
    projection: Callable[[Any], Any] | None = None
    data_size: int = 1
    tol: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver is not None:
            check_solver(self.solver)
        if self.tol is not None:
            check_positive("AIDBilevel: tol", self.tol)
            check_count("inner_steps", self.inner_steps, 1)

    def step(self, state: OuterState) -> tuple[OuterState, OuterInfo]:
        warm = self.warm_start and state.v is not None
        inner = _deterministic_inner(self.fixed_point, self.inner_loss, float(self.inner_step_size))
        if self.tol is not None:
            return self._step_within(state, inner, warm)
        w = _iterate(inner, state.params if warm else self.params0, state.hparams, self.inner_steps,
                     _inner_advice(self.inner_loss is not None))
        hg, hinfo = hypergrad(
            self.outer_loss, w, state.hparams, inner_loss=self.inner_loss, fixed_point=self.fixed_point,
            solver=self._solver(), init=state.v if warm else None, return_info=True,
            inner_tol=math.inf,  # inexact inner solutions by design: inner_steps and warm starts control them
        )
        lam = _descend(state.hparams, hg, as_step_size(self.lr, "lr"), state.step, self.projection)
        used = self.data_size * (self.inner_steps + hinfo.iterations + 2)  # + ∇f and the λ-part
        total = state.samples + used
        out = OuterInfo(state.step, item(T.norm(T.tree_flatten(hg)[0])), float(hinfo.inner_residual),
                        float(hinfo.residual), float(hinfo.outer_loss), used, total)
        return replace(state, hparams=lam, params=w, v=hinfo.v, step=state.step + 1, samples=total), out

    def _solver(self) -> Solver:
        return self.solver or (CG() if self.inner_loss is not None else FixedPoint())

    def _step_within(self, state: OuterState, inner: Callable[[Any, Any], Any],
                     warm: bool) -> tuple[OuterState, OuterInfo]:
        eps = self.tol / math.sqrt(state.step + 1)  # type: ignore[operator]
        hg, w, hinfo = hypergrad_within(
            self.outer_loss, state.params if warm else self.params0, state.hparams, tol=eps, inner_step=inner,
            inner_loss=self.inner_loss, fixed_point=self.fixed_point, solver=self._solver(),
            init=state.v if warm else None, max_inner=self.inner_steps,
        )
        lam = _descend(state.hparams, hg, as_step_size(self.lr, "lr"), state.step, self.projection)
        used = self.data_size * (hinfo.inner_iterations + hinfo.iterations + hinfo.error.products + 2)
        total = state.samples + used
        out = OuterInfo(state.step, item(T.norm(T.tree_flatten(hg)[0])), float(hinfo.inner_residual),
                        float(hinfo.residual), float(hinfo.outer_loss), used, total, float(hinfo.error_estimate))
        return replace(state, hparams=lam, params=w, v=hinfo.v, step=state.step + 1, samples=total), out


def _inner_advice(optimality: bool) -> str:
    """What to change when the deterministic inner iterations diverge."""
    if optimality:
        return ("inner_step_size must be < 2/L (L the largest eigenvalue of the Hessian of inner_loss): "
                "lower it.")
    return ("The step w + η(Φ(w) − w) contracts when fixed_point does and η = inner_step_size ≤ 1: lower "
            "inner_step_size, or check that fixed_point is a contraction (for Φ(w) = w − α∇g, α < 2/L).")


def _iterate(step: Callable[[Any, Any], Any], w0: Any, hparams: Any, steps: int, advice: str) -> Any:
    w = T.tree_map(lambda t: t.detach(), w0)
    lam = T.tree_map(lambda t: t.detach(), hparams)
    return iterate(step, w, lam, steps, "the inner fixed-point iterations", advice)[0]


@dataclass(frozen=True)
class ITDBilevel(_DeterministicLoop):
    """Deterministic bilevel solver with ITD hypergradients (reference).

    Each step: ``w_T`` from ``inner_steps`` steps of ``w ← w + η(Φ(w, λ) − w)`` (or
    ``w − η ∇_w g``) by :func:`bilevel.unroll` (``truncate=K``: back-propagate through the
    last K only), ``∇F ≈ d f(w_T(λ), λ)/dλ`` by reverse mode, then ``λ ← P(λ − α_s ∇F)``.
    ``warm_start=True`` starts the unroll from the previous ``w_T`` (detached).  The
    linear residual is ``nan`` (no linear system); the inner residual is
    ``‖Φ(w_T, λ) − w_T‖`` (or ``‖∇_w g‖``).  Divergent inner iterations raise
    :class:`~bilevel.NotContractionError` (as in :class:`AIDBilevel`), NaN/Inf in the
    hypergradient :class:`~bilevel.SolverError`; an ``hparams`` leaf with no autograd path
    to the outer loss through the unroll (its hypergradient would be a structural zero)
    ``ValueError`` naming it, as :class:`AIDBilevel` (through :func:`bilevel.hypergrad`).
    ``estimate=True``: ``OuterInfo.hypergrad_error`` estimates each step's ITD error by
    :func:`bilevel.hypergrad_error` at ``w_T`` (one AID solve and estimate more per step,
    counted in ``samples``).
    """

    outer_loss: Callable[[Any, Any], torch.Tensor]
    params0: Any
    fixed_point: Callable[[Any, Any], Any] | None = None
    inner_loss: Callable[[Any, Any], torch.Tensor] | None = None
    lr: StepSize | float = 0.1
    inner_steps: int = 100
    inner_step_size: float = 1.0
    truncate: int | None = None
    warm_start: bool = False
    _least_inner_steps = 1  # an unroll of 0 steps has no hypergradient (not a field: no annotation)
    projection: Callable[[Any], Any] | None = None
    data_size: int = 1
    estimate: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.estimate, bool):
            raise TypeError(f"ITDBilevel: estimate should be True or False, not {self.estimate!r}.")
        if self.truncate is not None and check_count("truncate", self.truncate, 1) > self.inner_steps:
            raise ValueError(f"truncate should be None or an int in [1, inner_steps={self.inner_steps}], "
                             f"not {self.truncate!r}.")

    def step(self, state: OuterState) -> tuple[OuterState, OuterInfo]:
        inner = _deterministic_inner(self.fixed_point, self.inner_loss, float(self.inner_step_size))
        norms: list[torch.Tensor] = []  # ‖w_{t+1} − w_t‖ of the forward pass, judged at the end

        def recorded(w: Any, lam: Any) -> Any:
            new = inner(w, lam)
            if len(norms) < self.inner_steps:  # a checkpointed backward calls the step again: not recorded
                norms.append(T.norm([(a - b).detach() for a, b in zip(T.tree_flatten(new)[0], T.tree_flatten(w)[0])]))
            return new

        w0 = state.params if (self.warm_start and state.step > 0) else self.params0
        w0 = T.tree_map(lambda t: t.detach(), w0)
        lam_leaves, lspec = T.tree_flatten(state.hparams)
        lam_leaves = [t.detach().requires_grad_() for t in lam_leaves]
        with torch.enable_grad():
            lam = T.tree_unflatten(lam_leaves, lspec)
            w_t = unroll(recorded, w0, lam, self.inner_steps, truncate=self.truncate)
            check_not_diverging(norms, T.tree_flatten(w_t)[0], "the unrolled inner iterations",
                                _inner_advice(self.inner_loss is not None))
            loss = scalar(self.outer_loss(w_t, lam), "outer_loss")
            grads = torch.autograd.grad(loss, lam_leaves, allow_unused=True)
        hg = [torch.zeros_like(x) if g is None else g.detach() for g, x in zip(grads, lam_leaves)]
        w_leaves = [t.detach() for t in T.tree_flatten(w_t)[0]]
        w_det = T.tree_unflatten(w_leaves, T.tree_flatten(w_t)[1])
        with torch.no_grad():
            lam_det = T.tree_unflatten([t.detach() for t in lam_leaves], lspec)
            # the step is η(Φ(w) − w) (or −η∇_w g): divide by η for ‖Φ(w) − w‖ (or ‖∇_w g‖)
            step = T.sub(T.tree_flatten(inner(w_det, lam_det))[0], w_leaves)
            res = T.norm(step) / float(self.inner_step_size)
        check_finite(hg, "the ITD hypergradient (lower inner_step_size?)")
        # autograd's own verdict: a leaf with no path from the outer loss through the unroll
        check_reached(hg, lspec, lambda: [i for i, g in enumerate(grads) if g is None])
        new_lam = _descend(state.hparams, T.tree_unflatten(hg, lspec), as_step_size(self.lr, "lr"), state.step,
                           self.projection)
        used = self.data_size * (2 * self.inner_steps + 2)  # forward + backward through the unroll
        error = None
        if self.estimate:  # judged against AID at w_T: ‖ĝ − ĝ_AID‖ + AID's estimate (bilevel.hypergrad_error)
            form = {"inner_loss": self.inner_loss} if self.inner_loss is not None else {"fixed_point": self.fixed_point}
            err = hypergrad_error(T.tree_unflatten(hg, lspec), self.outer_loss, w_det, lam_det, **form)
            error, used = float(err.total), used + self.data_size * err.products
        total = state.samples + used
        out = OuterInfo(state.step, item(T.norm(hg)), item(res), math.nan, item(loss.detach()), used, total,
                        hypergrad_error=error)
        return replace(state, hparams=new_lam, params=w_det, v=None, step=state.step + 1, samples=total), out

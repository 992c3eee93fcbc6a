"""Stochastic hypergradients (SID) and stochastic fixed-point iterations.

The inner problem is only reachable through minibatch estimates.  Fixed-point form::

    w(λ) = Φ(w(λ), λ),   Φ(w, λ) = E_ξ Φ̂(w, λ, ξ)   (Φ a contraction in w)

or optimality form ``∇_w g(w(λ), λ) = 0`` with ``g(w, λ) = E_ξ ĝ(w, λ, ξ)``, and the outer
loss ``f(w, λ) = E_ζ f̂(w, λ, ζ)``.  SID (Grazzi, Pontil, Salzo, "Convergence Properties of
Stochastic Hypergradients", AISTATS 2021) estimates ``∇F(λ)`` in three stages:

1. stochastic fixed-point iterations (SGD for an ``inner_loss``), ``t < inner_steps``::

       w_{t+1} = w_t + η_t (Φ̂(w_t, λ, ξ_t) − w_t)        (or w_t − η_t ∇_w ĝ(w_t, λ, ξ_t))

2. the same iterations on the linear system of the implicit function theorem at ``w = w_t``,
   ``k < linear_steps``, each with a fresh inner batch ``ζ_k`` and outer batch ``ζ'_k``::

       v_{k+1} = v_k + η_k (∂_wΦ̂(w, λ, ζ_k)ᵀ v_k + ∇_w f̂(w, λ, ζ'_k) − v_k)
               (or v_k + η_k (∇_w f̂(w, λ, ζ'_k) − ∇²_w ĝ(w, λ, ζ_k) v_k))

3. the λ-part averaged over ``hparam_batches`` fresh batch pairs::

       ∇̂F(λ) = mean_j [∇_λ f̂(w, λ, ζ'_j) + ∂_λΦ̂(w, λ, ξ_j)ᵀ v]   (or − ∂²_{λw} ĝᵀ v)

Step sizes are values: :class:`ConstantStep` (``η_t = η``; ``η = 1`` with a minibatch map
is the plain minibatch fixed-point iteration of Grazzi, Pontil, Salzo, JMLR 2023) or
:class:`DecreasingStep` (``η_t = β/(γ + t)``, the O(1/t) mean-square-error schedule of
AISTATS 2021).  With the fixed-point form, ``η_t ≤ 1`` keeps every step an average of
contractions; with an ``inner_loss`` the step is a learning rate (``η < 2/L``).

Data: any iterable of batches (a ``torch.utils.data.DataLoader``, a list of tensors, a
generator).  User functions take the batch as a third argument:
``fixed_point(params, hparams, batch)``, ``inner_loss(params, hparams, batch)``,
``outer_loss(params, hparams, batch)``.  One batch is drawn per step from a
:class:`BatchStream`.  When the iterable runs out it is iterated again from the start if
it is re-iterable (``iter(x) is not x``: a DataLoader, a list: one more epoch); a one-shot
iterator (a generator, ``iter(...)``) raises :class:`DataExhaustedError`, and so does an
iterable that yields no batch at all.  Wrap an infinite generator, or pass the same
:class:`BatchStream` to successive calls so that they continue where the last one stopped.

Every vjp closure is built once per batch with :func:`bilevel.ift.implicit_operator`
(the same IFT code as the deterministic :func:`bilevel.hypergrad`); ``params``/``hparams``
are tensors or pytrees of tensors (an ``nn.Module`` through
``torch.func.functional_call(model, params, ...)``, as in the core).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.func import grad, vjp

from bilevel import _rng
from bilevel import _tree as T
from bilevel._checks import (
    SolverError,
    check_batch,
    check_count,
    check_finite,
    check_input_finite,
    check_not_diverging,
    check_one_form,
    check_positive,
    check_reached,
    check_shaped_like,
    eager,
    info_number,
    info_pytree,
    prepare_pair,
    scalar,
    unreached,
)
from bilevel.ift import implicit_operator

__all__ = [
    "ConstantStep",
    "DecreasingStep",
    "StepSize",
    "BatchStream",
    "DataExhaustedError",
    "SIDInfo",
    "sid",
    "stochastic_fixed_point",
]

Leaves = list[torch.Tensor]


_NOTHING = object()  # a batch no iterable yields


class DataExhaustedError(ValueError):
    """The batch iterable yielded no batch, or a one-shot iterator ran out."""


@dataclass(frozen=True)
class ConstantStep:
    """Constant step size ``η_t = eta``."""

    eta: float = 1.0

    def __post_init__(self) -> None:
        check_positive("ConstantStep: eta", self.eta)

    def __call__(self, t: int) -> float:
        return float(self.eta)


@dataclass(frozen=True)
class DecreasingStep:
    """Decreasing step size ``η_t = beta / (gamma + t)``, ``t = 0, 1, ...``.

    The schedule of Grazzi, Pontil, Salzo (AISTATS 2021): for a map that is a
    q-contraction in mean square, the error of ``w_t`` (and of ``v_k``) contracts by about
    ``1 − η_t(1 − q²)`` per step, so ``beta·(1 − q²) > 1`` gives a mean squared error
    ``O(1/t)``; ``gamma ≥ beta`` keeps ``η_t ≤ 1`` (``η_0 = beta/gamma``).
    """

    beta: float = 1.0
    gamma: float = 1.0

    def __post_init__(self) -> None:
        check_positive("DecreasingStep: beta", self.beta)
        check_positive("DecreasingStep: gamma", self.gamma)

    def __call__(self, t: int) -> float:
        return float(self.beta) / (float(self.gamma) + t)

    @classmethod
    def for_contraction(cls, q: float) -> DecreasingStep:
        """``beta = gamma = 2/(1 − q²)`` (``η_0 = 1``) for a map with contraction factor ``q ∈ [0, 1)``."""
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q < 1:
            raise ValueError(f"DecreasingStep.for_contraction: q should be in [0, 1) (a contraction), not {q!r}.")
        b = 2.0 / (1.0 - q * q)
        return cls(b, b)


StepSize = ConstantStep | DecreasingStep


def as_step_size(value: Any, name: str) -> StepSize:
    """A step-size value from a schedule or a positive float (then constant)."""
    if isinstance(value, (ConstantStep, DecreasingStep)):
        return value
    if isinstance(value, type) and issubclass(value, (ConstantStep, DecreasingStep)):
        raise TypeError(f"{name} should be a step-size value, not the class: write {value.__name__}(...).")
    if not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} should be a float > 0, ConstantStep(eta) or DecreasingStep(beta, gamma); got {value!r}."
        )
    return ConstantStep(check_positive(name, value))  # a bool is refused there: True is not a step


def _batch_size(batch: Any) -> int:
    """Samples in a batch: leading dimension of its first tensor (0-d: 1; no tensor: 0)."""
    for leaf in T.tree_flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor):
            return int(leaf.shape[0]) if leaf.dim() > 0 else 1
    return 0


class BatchStream:
    """Batches drawn one at a time from an iterable, with a count of the samples used.

    ``next()`` returns the next batch.  At the end of the iterable, a re-iterable source
    (``iter(source) is not source``: DataLoader, list, tuple) starts again from its
    beginning; a one-shot iterator raises :class:`DataExhaustedError`, as does a source
    that yields nothing.  ``samples`` counts the leading dimension of each batch's first
    tensor; ``batches`` the batches drawn; ``epochs`` the completed passes.  A batch with
    0 rows is refused (``ValueError``): a loss averaged over no samples has zero gradient.
    """

    def __init__(self, source: Iterable[Any]):
        if isinstance(source, BatchStream):
            raise TypeError("source is already a BatchStream: pass it as is, do not wrap it.")
        try:
            self._it: Iterator[Any] = iter(source)
        except TypeError:
            raise TypeError(
                f"batches should be an iterable of batches (a DataLoader, a list, a generator), "
                f"not {type(source).__name__}."
            ) from None
        self._source = source
        self._reiterable = self._it is not source
        self._since_restart = 0
        self.samples = 0
        self.batches = 0
        self.epochs = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            batch = self._restart()
        check_batch(batch, f"batch {self.batches + 1} drawn from the data")
        self._since_restart += 1
        self.batches += 1
        self.samples += _batch_size(batch)
        return batch

    def _restart(self) -> Any:
        if self._since_restart == 0:
            raise DataExhaustedError(
                "the batch iterable yielded no batch: it is empty (an empty DataLoader/list, "
                "or an iterator already consumed). Pass a non-empty iterable of batches."
            )
        if not self._reiterable:
            raise DataExhaustedError(
                f"the batch iterator ran out after {self._since_restart} batches and cannot be "
                "restarted (it is a one-shot iterator, e.g. a generator). Pass a re-iterable "
                "source (a DataLoader, a list) to loop over epochs, an infinite generator, or "
                "fewer steps."
            )
        self.epochs += 1
        self._since_restart = 0
        self._it = iter(self._source)
        try:
            return next(self._it)
        except StopIteration:
            raise DataExhaustedError(
                "the batch iterable yielded no batch when iterated again: it is empty now."
            ) from None


def as_stream(batches: Iterable[Any] | BatchStream) -> BatchStream:
    """``batches`` itself if it is a :class:`BatchStream`, else a new one over it."""
    return batches if isinstance(batches, BatchStream) else BatchStream(batches)


@contextmanager
def _explain_batch(name: str, batch: Any, params: Any, first: bool):
    """On the first batch, turn a shape error of a user function into a clear ValueError."""
    if not first:
        yield
        return
    try:
        yield
    except (RuntimeError, IndexError) as err:
        if isinstance(err, SolverError):
            raise
        raise ValueError(
            f"{name}(params, hparams, batch) failed on the first batch ({T.describe(batch)}) "
            f"with params {T.describe(params)}: {err}. Check that the batches have the shapes "
            f"{name} expects (e.g. the feature dimension of the data matches params)."
        ) from err


@partial(info_pytree, static=("samples",))  # returnable under vmap
@dataclass(frozen=True)
class SIDInfo:
    """What :func:`sid` did.

    ``params``: the inner iterate ``w_t``; ``v``: the linear-system iterate (both shaped
    like ``params``; pass them back as ``params0=``/``v0=`` to warm-start).
    ``inner_residual``: mean over the linear-step batches of ``‖Φ̂(w_t, λ, ζ) − w_t‖``
    (or ``‖∇_w ĝ(w_t, λ, ζ)‖``), an upper estimate of the inner error that includes the
    sampling noise; ``linear_residual``: ``‖mean_j r_j‖ / ‖mean_j ∇_w f̂_j‖`` over the last
    half of the linear steps, with ``r_j = ∇_w f̂ − (I − ∂_wΦ̂)ᵀ v_j`` (or ``∇_w f̂ − Ĥ v_j``);
    ``outer_loss``: mean of ``f̂`` over the λ-part batches; ``samples``: samples drawn from
    both streams by this call.
    """

    params: Any
    v: Any
    inner_residual: float | torch.Tensor
    linear_residual: float | torch.Tensor
    outer_loss: float | torch.Tensor
    samples: int


def _inner_update(
    fixed_point: Callable[..., Any] | None,
    inner_loss: Callable[..., torch.Tensor] | None,
    wspec: Any,
    lspec: Any,
) -> Callable[[Leaves, Leaves, Any], Leaves]:
    """(w, λ, batch) -> the step direction Φ̂(w, λ, batch) − w (or −∇_w ĝ(w, λ, batch))."""
    if inner_loss is not None:

        def g(wl: Leaves, ll: Leaves, batch: Any) -> torch.Tensor:
            out = inner_loss(T.tree_unflatten(list(wl), wspec), T.tree_unflatten(list(ll), lspec), batch)
            return scalar(out, "inner_loss")

        grad_w = grad(g)

        def direction(w: Leaves, lam: Leaves, batch: Any) -> Leaves:
            return [-t for t in grad_w(w, lam, batch)]

        return direction

    def residual(w: Leaves, lam: Leaves, batch: Any) -> Leaves:
        out = fixed_point(T.tree_unflatten(list(w), wspec), T.tree_unflatten(list(lam), lspec), batch)
        leaves, ospec = T.tree_flatten(out)
        check_shaped_like(leaves, ospec, w, wspec, "fixed_point(params, hparams, batch)")
        return T.sub(leaves, w)

    return residual


def _advice(name: str, option: str, linear: bool = False) -> str:
    """What to change when the iterations on ``name``'s problem (or its linear system) diverge."""
    if name == "inner_loss":
        return (
            f"The step size must be < 2/L (L the largest eigenvalue of the Hessian of inner_loss, "
            f"for every batch): lower {option}."
        )
    if linear:
        return (
            f"The iteration contracts when ∂_wΦ̂ does (‖∂_wΦ̂‖ < 1, fixed_point a contraction) and "
            f"{option} ≤ 1: lower {option}, or make fixed_point a contraction (for Φ̂(w) = w − α∇ĝ, "
            "α < 2/L)."
        )
    return (
        f"The step w + η(Φ̂(w) − w) contracts when fixed_point does and η ≤ 1 (for Φ̂(w) = w − α∇ĝ, "
        f"η·α must be < 2/L, L the largest Hessian eigenvalue): lower {option}, or check that "
        "fixed_point is a contraction."
    )


def _run_inner(
    direction: Callable[[Leaves, Leaves, Any], Leaves],
    w: Leaves,
    lam: Leaves,
    wspec: Any,
    stream: BatchStream,
    steps: int,
    step_size: StepSize,
    name: str,
    option: str,
) -> Leaves:
    norms = []  # ‖step direction‖ per step, on the device: judged once at the end
    for t in range(steps):
        batch = stream.next()
        with _explain_batch(name, batch, T.tree_unflatten(list(w), wspec), t == 0):
            d = direction(w, lam, batch)
        w = T.axpy(step_size(t), d, w)
        norms.append(T.norm(d))
    check_not_diverging(norms, w, f"the stochastic fixed-point iterations on {name}", _advice(name, option))
    return w


@eager  # under torch.compile: runs eagerly (a graph break), never mis-traced
@torch.no_grad()  # torch.func transforms inside still differentiate; no graph to captured tensors
def stochastic_fixed_point(
    params0: Any,
    hparams: Any,
    batches: Iterable[Any] | BatchStream,
    *,
    fixed_point: Callable[[Any, Any, Any], Any] | None = None,
    inner_loss: Callable[[Any, Any, Any], torch.Tensor] | None = None,
    steps: int = 100,
    step_size: StepSize | float = 1.0,
) -> Any:
    """Stochastic fixed-point iterations ``w_{t+1} = w_t + η_t (Φ̂(w_t, λ, ξ_t) − w_t)``.

    Approximates the fixed point ``w(λ) = E_ξ Φ̂(w(λ), λ, ξ)`` of a map that is a
    contraction in expectation, one batch ``ξ_t`` per step from ``batches`` (see
    :class:`BatchStream` for what happens when it runs out).  With ``inner_loss=`` it is
    SGD, ``w_{t+1} = w_t − η_t ∇_w ĝ(w_t, λ, ξ_t)``.  Returns ``w_T`` (detached), shaped
    like ``params0``.  ``η_t`` from ``step_size`` (:class:`ConstantStep`,
    :class:`DecreasingStep`, or a float).  Raises :class:`NotContractionError` when the
    iterations diverge: NaN/Inf, a blow-up, or step norms that clearly grow over the run
    (:func:`bilevel._checks.check_not_diverging`: a step just above ``2/L`` is caught from
    about 100 steps on).  A batch with 0 rows raises ``ValueError``.
    """
    check_one_form(inner_loss, fixed_point)
    check_count("steps", steps)
    eta = as_step_size(step_size, "step_size")
    w, wspec, lam, lspec = prepare_pair(params0, hparams, "params0")
    name = "inner_loss" if inner_loss is not None else "fixed_point"
    w = _run_inner(_inner_update(fixed_point, inner_loss, wspec, lspec), w, lam, wspec, as_stream(batches), steps,
                   eta, name, "step_size")
    return T.tree_unflatten(w, wspec)


@eager  # under torch.compile: runs eagerly (a graph break), never mis-traced
@torch.no_grad()  # torch.func transforms inside still differentiate; no graph to captured tensors
def sid(
    outer_loss: Callable[[Any, Any, Any], torch.Tensor],
    params0: Any,
    hparams: Any,
    batches: Iterable[Any] | BatchStream,
    *,
    fixed_point: Callable[[Any, Any, Any], Any] | None = None,
    inner_loss: Callable[[Any, Any, Any], torch.Tensor] | None = None,
    outer_batches: Iterable[Any] | BatchStream | None = None,
    inner_steps: int = 100,
    linear_steps: int = 100,
    hparam_batches: int = 1,
    inner_step_size: StepSize | float = 1.0,
    linear_step_size: StepSize | float = 1.0,
    v0: Any = None,
    return_info: bool = False,
) -> Any:
    """Stochastic implicit differentiation (SID): an estimate of ``∇F(λ)``.

    ``F(λ) = E f̂(w(λ), λ, ζ)`` with ``w(λ)`` the fixed point of ``E Φ̂(·, λ, ξ)``
    (``fixed_point=``) or the minimiser of ``E ĝ(·, λ, ξ)`` (``inner_loss=``); pass exactly
    one.  Runs ``inner_steps`` stochastic fixed-point iterations from ``params0``, then
    ``linear_steps`` stochastic iterations on ``(I − ∂_wΦ)ᵀ v = ∇_w f`` (or ``H v = ∇_w f``)
    from ``v0`` (default 0), then averages ``∇_λ f̂ + (∂_λΦ̂)ᵀ v`` (or ``∇_λ f̂ − (∂²_{λw} ĝ)ᵀ
    v``) over ``hparam_batches`` batches; the module docstring gives the updates.
    Grazzi, Pontil, Salzo, AISTATS 2021.

    ``batches`` feeds ``Φ̂``/``ĝ`` and ``outer_batches`` (default: the same stream) feeds
    ``outer_loss(params, hparams, batch)``; for an outer loss that needs no data pass
    ``outer_batches=[None]``, for a small validation set ``outer_batches=[(X_val, y_val)]``
    (``∇_w f̂`` is computed once when the stream yields the same batch object again: the
    user functions must be pure).  ``inner_steps=0`` uses ``params0`` as is.

    Returns a pytree shaped like ``hparams`` (detached), or ``(hypergrad, SIDInfo)`` with
    ``return_info=True``.  Raises ``ValueError`` for misuse (shapes, steps, empty data),
    :class:`DataExhaustedError` when a one-shot iterator runs out, and
    :class:`NotContractionError` when an iteration diverges (NaN/Inf, a blow-up, or step
    norms that clearly grow: see :func:`stochastic_fixed_point`); a batch with 0 rows raises
    ``ValueError``, and so does an ``hparams`` leaf whose estimate is exactly zero because it
    reaches neither ``outer_loss`` nor ``fixed_point``/``∇_w inner_loss`` on the λ-part
    batches (it is named).
    """
    check_one_form(inner_loss, fixed_point)
    check_count("inner_steps", inner_steps)
    check_count("linear_steps", linear_steps, 1)
    check_count("hparam_batches", hparam_batches, 1)
    eta_w = as_step_size(inner_step_size, "inner_step_size")
    eta_v = as_step_size(linear_step_size, "linear_step_size")
    w, wspec, lam, lspec = prepare_pair(params0, hparams, "params0")
    inner = as_stream(batches)
    outer = inner if outer_batches is None else as_stream(outer_batches)
    start = inner.samples + (outer.samples if outer is not inner else 0)
    name = "inner_loss" if inner_loss is not None else "fixed_point"

    # 1. inner problem
    w = _run_inner(_inner_update(fixed_point, inner_loss, wspec, lspec), w, lam, wspec, inner, inner_steps, eta_w, name,
                   "inner_step_size")
    w_tree = T.tree_unflatten(list(w), wspec)

    def f_at(batch: Any) -> Callable[[Leaves, Leaves], torch.Tensor]:
        def f(wl: Leaves, ll: Leaves) -> torch.Tensor:
            out = outer_loss(T.tree_unflatten(list(wl), wspec), T.tree_unflatten(list(ll), lspec), batch)
            return scalar(out, "outer_loss")

        return f

    def operator(batch: Any):  # the IFT operator of the batch map, vjp closure built once
        if inner_loss is not None:
            return implicit_operator(w, lam, wspec, lspec, inner_loss=lambda p, h: inner_loss(p, h, batch))
        return implicit_operator(w, lam, wspec, lspec, fixed_point=lambda p, h: fixed_point(p, h, batch))

    # 2. linear system, v_{k+1} = v_k + η_k (∇_w f̂ − A_k v_k)
    if v0 is None:
        v = T.zeros_like(w)
    else:
        v, vspec = T.tree_flatten(v0)
        if vspec != wspec or any(not isinstance(a, torch.Tensor) or a.shape != b.shape for a, b in zip(v, w)):
            raise ValueError(f"v0 should be shaped like params0 ({T.describe(w_tree)}), got {T.describe(v0)}.")
        v = [t.detach() for t in v]
        check_input_finite(v, "v0")
    tail = max(1, linear_steps // 2)  # residual estimate: mean over the last half
    r_sum = b_sum = None
    inner_res = torch.zeros((), dtype=w[0].dtype, device=w[0].device)
    norms = []  # ‖residual‖ per step, on the device: judged once at the end
    prev_ob: Any = _NOTHING
    for k in range(linear_steps):
        zb, ob = inner.next(), outer.next()
        with _explain_batch(name, zb, w_tree, k == 0):
            op = operator(zb)
        if ob is not prev_ob:  # the same batch object again (outer_batches=[val]): same ∇_w f̂, w is fixed
            with _explain_batch("outer_loss", ob, w_tree, k == 0):
                gw = grad(f_at(ob))(w, lam)
            prev_ob = ob
        r = T.sub(gw, op.matvec(v))
        v = T.axpy(eta_v(k), r, v)
        inner_res = inner_res + op.inner_residual
        norms.append(T.norm(r))
        if k >= linear_steps - tail:
            r_sum = r if r_sum is None else T.add(r_sum, r)
            b_sum = gw if b_sum is None else T.add(b_sum, gw)
    check_not_diverging(norms, v, "the stochastic iterations on the linear system",
                        _advice(name, "linear_step_size", linear=True))

    # 3. λ-part, averaged over hparam_batches fresh batch pairs
    hg = T.zeros_like(lam)
    fsum = torch.zeros((), dtype=w[0].dtype, device=w[0].device)
    pairs = []  # the λ-part batches: where an hparams leaf must reach something
    for _ in range(hparam_batches):
        zb, ob = inner.next(), outer.next()
        pairs.append((zb, ob))
        fval, f_vjp = vjp(f_at(ob), w, lam)
        gl = f_vjp(torch.ones_like(fval))[1]
        hg = T.add(hg, T.add(gl, operator(zb).cross(v)))
        fsum = fsum + fval.detach()
    hg = T.scale(1.0 / hparam_batches, hg)
    check_finite(hg, "the stochastic hypergradient")  # every vmap row
    check_reached(hg, lspec, lambda: _unused_hparams(f_at, fixed_point, inner_loss, w, lam, wspec, lspec, pairs))

    out = T.tree_unflatten([t.detach() for t in hg], lspec)
    if not return_info:
        return out
    bnorm = T.norm(b_sum)  # type: ignore[arg-type]
    lin = T.norm(r_sum) / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))  # type: ignore[arg-type]
    used = inner.samples + (outer.samples if outer is not inner else 0) - start
    info = SIDInfo(
        params=w_tree,
        v=T.tree_unflatten([t.detach() for t in v], wspec),
        inner_residual=info_number(inner_res / linear_steps),  # per task under vmap
        linear_residual=info_number(lin),
        outer_loss=info_number(fsum / hparam_batches),
        samples=used,
    )
    return out, info


def _unused_hparams(
    f_at: Callable[[Any], Callable[[Leaves, Leaves], torch.Tensor]],
    fixed_point: Callable[..., Any] | None,
    inner_loss: Callable[..., torch.Tensor] | None,
    w: Leaves,
    lam: Leaves,
    wspec: Any,
    lspec: Any,
    pairs: list[tuple[Any, Any]],
) -> list[int]:
    """Indices of the hparams leaves with no autograd path, on any λ-part batch pair
    ``(ξ_j, ζ'_j)``, to ``f̂(w, λ, ζ'_j)`` nor to ``Φ̂(w, λ, ξ_j)`` (or ``∇_w ĝ(w, λ, ξ_j)``):
    the terms the estimate of such a leaf sums are all structurally zero.  The user
    functions are called once more per pair (no batch is drawn; the random generators'
    state is restored afterwards, for a map that uses dropout)."""

    def reached(ll: Leaves) -> list[Any]:
        wl = [t.detach().requires_grad_() for t in w]
        outs: list[Any] = []
        for zb, ob in pairs:
            outs.append(f_at(ob)(wl, ll))
            p, h = T.tree_unflatten(list(wl), wspec), T.tree_unflatten(list(ll), lspec)
            if inner_loss is not None:
                gval = scalar(inner_loss(p, h, zb), "inner_loss")
                outs += list(torch.autograd.grad(gval, wl, create_graph=True, allow_unused=True))
            else:
                outs += T.tree_flatten(fixed_point(p, h, zb))[0]  # type: ignore[misc]
        return outs

    with _rng.replayed(_rng.capture(list(w) + list(lam))):
        return unreached(reached, lam)

"""The trust policy, in one place: every public entry point checks and reports through here.

* structural misuse (types, shapes, pytree structure, option values) → an eager
  ``ValueError`` / ``TypeError`` that names the fix;
* a problem that makes the answer meaningless (NaN/Inf, divergence, a singular or
  inconsistent system, wrong curvature) → a :class:`SolverError` subclass;
* a result that did not meet its tolerance → a :class:`ConvergenceWarning` that gives the
  residual reached and what to change (``warnings.simplefilter("error",
  bilevel.ConvergenceWarning)`` turns it into an error).

Checks that need data also run under ``torch.func`` transforms: :func:`values` reads the
data behind a vmap-batched (or grad-wrapped) tensor, so a batch of tasks is checked row by
row exactly as a loop over the tasks would be, never skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch
from torch.utils._pytree import register_pytree_node

try:  # private functorch hooks: which transforms are active, and the data behind a wrapper
    from torch._C import _functorch as _ft
    from torch._C._functorch import peek_interpreter_stack as _peek_interpreter_stack
except ImportError:  # pragma: no cover
    _ft = None
    _peek_interpreter_stack = None

from bilevel import _tree as T

Leaves = list[torch.Tensor]

# Step-norm growth (relative to the start) at which a stochastic or Picard/Anderson
# iteration is declared divergent at once; slower divergence is judged at exit from the
# trend (check_not_diverging, check_not_growing; Richardson: check_residual_trend).
DIVERGENCE_FACTOR = 1e6


class SolverError(RuntimeError):
    """A solve failed numerically (NaN/Inf, breakdown, wrong curvature): the answer would be meaningless."""


class NotContractionError(SolverError):
    """A fixed-point (Richardson / Neumann / stochastic) iteration diverged or stagnated:
    its map is not a contraction."""


class SingularSystemError(SolverError):
    """The linear system is singular and inconsistent (e.g. a parameter the inner loss ignores
    but the outer loss uses): no solution exists, so there is no hypergradient."""


class ConvergenceWarning(UserWarning):
    """An iterative solve stopped before reaching its tolerance; the message gives the residual."""


# ----------------------------------------------------------------------------- transforms


def no_transform() -> bool:
    """True when no torch.func transform (vmap, grad, jvp) is active."""
    return _peek_interpreter_stack is not None and _peek_interpreter_stack() is None


def active_transforms() -> set[str]:
    """Names of the active torch.func transforms (``"Vmap"``, ``"Grad"``, ``"Jvp"``, ...)."""
    if _peek_interpreter_stack is None:
        return set()
    names = set()
    stack = _ft.get_interpreter_stack() if hasattr(_ft, "get_interpreter_stack") else None
    if stack is not None:
        for interp in stack:
            names.add(str(interp.key()).split(".")[-1])
        return names
    top = _peek_interpreter_stack()
    return set() if top is None else {str(top.key()).split(".")[-1]}


def values(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor behind ``t``: under ``vmap`` all rows of the batch (the batch
    dimensions somewhere in the shape), under ``grad``/``jvp`` the primal value.  For
    reading only (reductions: any, all, max), never for computing a result."""
    if _ft is None:
        return t
    while _ft.is_functorch_wrapped_tensor(t) or _ft.is_batchedtensor(t):
        t = _ft.get_unwrapped(t)
    return t


def item(t: torch.Tensor) -> Any:
    """``t.item()``, or ``t`` itself when it is batched by ``vmap`` (a per-row field)."""
    try:
        return t.item()
    except RuntimeError:
        return t


def worst(t: torch.Tensor) -> float:
    """The largest value of ``t`` over every vmap row, as a float (NaN if any row is NaN)."""
    v = values(t).detach()
    return float(v.max()) if not torch.isnan(v).any() else math.nan


def is_batched(t: torch.Tensor) -> bool:
    return _ft is not None and values(t).shape != t.shape


def differentiable(create_graph: bool) -> bool:
    """Whether a hypergradient routine must return a differentiable result (a second-order
    hypergradient): under torch.func.grad / jacrev / jvp — detaching there would silently
    give zeros — or with plain autograd when asked by ``create_graph=True``, as for
    ``torch.autograd.grad``.  Otherwise results are detached: no graph is kept alive."""
    if active_transforms() & {"Grad", "Jvp"}:
        return True
    return create_graph and torch.is_grad_enabled()


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` eagerly when torch.compile meets it (a graph break), directly
    (``torch.compile(fn)``) or inside compiled code: its solver loops read residuals on the
    host and look behind torch.func wrappers, which inductor cannot trace.  (A plain
    ``torch.compiler.disable`` is stripped when ``fn`` itself is compiled, hence the wrapper.)"""
    body = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return body(*args, **kwargs)

    return wrapper


def info_pytree(cls: type, static: tuple[str, ...]) -> type:
    """Register a frozen info dataclass as a pytree node, so that a function under
    ``torch.func.vmap`` can return it (``return_info=True``): the per-task numbers are
    leaves, the ``static`` fields (a solver's name, an iteration count) the context, and so is
    a field that is None (a part not computed: vmap returns tensors only)."""
    names = [f.name for f in dataclasses.fields(cls)]
    dynamic = [n for n in names if n not in static]

    def flatten(info: Any) -> tuple[list[Any], tuple[Any, ...]]:
        absent = tuple(n for n in dynamic if getattr(info, n) is None)
        leaves_ = [getattr(info, n) for n in dynamic if n not in absent]
        return leaves_, (absent, *(getattr(info, n) for n in static))

    def unflatten(leaves_: Any, context: tuple[Any, ...]) -> Any:
        absent, fixed = context[0], context[1:]
        present = [n for n in dynamic if n not in absent]
        return cls(**dict(zip(present, leaves_)), **dict.fromkeys(absent), **dict(zip(static, fixed)))

    register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"bilevel.{cls.__name__}")
    return cls


# ----------------------------------------------------------------------------- options


def check_count(name: str, value: Any, least: int = 0) -> int:
    """An int option (never a bool: ``True`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} should be an int >= {least}, not {value!r}.")
    return value


def check_tol(name: str, value: Any) -> float:
    """A tolerance: a finite real >= 0 (never a bool: ``tol=True`` would read as 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} should be a finite float >= 0, not {value!r}.")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """A step size or scale: a finite real > 0 (never a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} should be a finite float > 0, not {value!r}.")
    return float(value)


# ----------------------------------------------------------------------------- inputs


def check_autograd(name: str) -> None:
    """Refuse to run under torch.inference_mode(): there autograd records nothing, and every
    derivative would silently come out as zero."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{name} differentiates with autograd, which torch.inference_mode() switches off "
            "(the result would be zeros). Call it outside inference_mode; torch.no_grad() is fine."
        )


def leaves(tree: Any, name: str) -> tuple[Leaves, Any]:
    """Leaves and spec of a pytree of floating tensors (inference tensors are cloned into
    normal ones: autograd cannot record them)."""
    out, spec = T.tree_flatten(tree)
    if not out:
        raise ValueError(f"{name} is empty: it should be a tensor or a pytree of tensors.")
    for t in out:
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name} should be a tensor or a pytree (tuple/list/dict) of tensors; it "
                f"holds a {type(t).__name__}. Convert it with torch.as_tensor(...)."
            )
        if not t.is_floating_point():
            raise TypeError(
                f"{name} should hold floating-point tensors, not {t.dtype}: "
                f"use .to(torch.float64) (or float32)."
            )
    if any(t.is_inference() for t in out):
        out = [t.clone() if t.is_inference() else t for t in out]
    return out, spec


def leaves_pair(params: Any, hparams: Any, pname: str) -> tuple[tuple[Leaves, Any], tuple[Leaves, Any]]:
    """Leaves and specs of ``params`` and ``hparams``, which must share one float dtype."""
    w, wspec = leaves(params, pname)
    lam, lspec = leaves(hparams, "hparams")
    dtypes = {t.dtype for t in w + lam}
    if len(dtypes) > 1:
        raise TypeError(
            f"{pname} and hparams should share one dtype, got {sorted(map(str, dtypes))}: "
            "cast them with .to(torch.float64) (or float32)."
        )
    return (w, wspec), (lam, lspec)


def prepare_pair(params: Any, hparams: Any, pname: str) -> tuple[Leaves, Any, Leaves, Any]:
    """Detached, finite leaves (and specs) of ``params`` and ``hparams`` of one dtype."""
    check_autograd("this solver")
    (w, wspec), (lam, lspec) = leaves_pair(params, hparams, pname)
    w = [t.detach() for t in w]
    lam = [t.detach() for t in lam]
    check_input_finite(w, pname)
    check_input_finite(lam, "hparams")
    return w, wspec, lam, lspec


def check_shaped_like(out: Leaves, ospec: Any, w: Leaves, wspec: Any, what: str, like: str = "params",
                      verb: str = "should return") -> None:
    """Raise unless ``out`` (leaves, spec) has the structure, shapes and dtypes of ``w``
    (``what`` is a function's output, or with ``verb="should be"`` an argument)."""
    if ospec != wspec or any(
        not isinstance(o, torch.Tensor) or o.shape != x.shape or o.dtype != x.dtype for o, x in zip(out, w)
    ):
        raise ValueError(
            f"{what} {verb} a pytree with the structure and shapes of {like} "
            f"({T.describe(T.tree_unflatten(list(w), wspec))}) and its dtype, "
            f"got {T.describe(T.tree_unflatten(list(out), ospec))}."
        )


def all_finite(leaves_: Sequence[torch.Tensor]) -> bool:
    """Every entry of every leaf finite, every vmap row included, with one host read.

    First the leaves' Euclidean norms, in one ``_foreach_norm`` call: a finite norm means
    every entry is finite.  A norm that is not (a NaN or Inf, or squares that overflow the
    dtype) is settled by each leaf's minimum and maximum (a NaN reaches both, an Inf one)."""
    vals = [v for v in (values(t).detach() for t in leaves_) if v.is_floating_point() or v.is_complex()]
    if not vals:  # integers are always finite
        return True
    if len({v.device for v in vals}) == 1:
        try:
            if bool(torch.isfinite(torch.stack(torch._foreach_norm(vals))).all()):
                return True
        except RuntimeError:  # a dtype or layout _foreach_norm does not take: the exact read below
            pass
    ends: list[torch.Tensor] = []
    for v in vals:
        if v.numel() > 0:
            ends.extend(torch.aminmax(torch.view_as_real(v) if v.is_complex() else v))
    if not ends:
        return True
    if len({e.device for e in ends}) > 1:  # leaves on several devices: one read per leaf
        return all(bool(torch.isfinite(e)) for e in ends)
    return bool(torch.isfinite(torch.stack(ends)).all())


def check_input_finite(leaves_: Sequence[torch.Tensor], name: str) -> None:
    if not all_finite(leaves_):
        raise ValueError(f"{name} contains NaN or Inf; the hypergradient would be meaningless.")


def check_finite(leaves_: Sequence[torch.Tensor], what: str) -> None:
    """Raise :class:`SolverError` if any leaf (any vmap row) holds NaN/Inf."""
    if not all_finite(leaves_):
        raise SolverError(
            f"NaN or Inf in {what}. Check the inputs and the losses for NaN/Inf, "
            f"and that the linear system is well posed (a contraction / positive definite)."
        )


def scalar(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"{name} should return a scalar tensor, got {shape}. Reduce it, e.g. with "
            f".mean() or .sum()."
        )
    return value.reshape(())


def check_batch(batch: Any, where: str) -> None:
    """Refuse a batch with 0 rows: a mean over nothing has zero gradient, so the estimate
    would silently be zero or biased."""
    for t in T.tree_flatten(batch)[0]:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 0:
            raise ValueError(
                f"{where}: a batch has 0 rows ({T.describe(batch)}); a loss averaged over no "
                "samples has zero gradient. Drop empty batches (DataLoader(drop_last=True)) "
                "or check how the data is split."
            )


# ----------------------------------------------------------------------------- results


def leaf_paths(spec: Any) -> list[str]:
    n = spec.num_leaves
    try:
        from torch.utils._pytree import keystr, tree_flatten_with_path

        dummy = T.tree_unflatten(list(range(n)), spec)
        return [keystr(p) or "hparams" for p, _ in tree_flatten_with_path(dummy)[0]]
    except Exception:
        return [f"#{i}" for i in range(n)]


def check_reached(hg: Leaves, lspec: Any, find_unused: Callable[[], list[int]]) -> None:
    """Raise if an all-zero hypergradient leaf comes from an hparam that reaches nothing."""
    nonzero = [values(t).detach().any() for t in hg]
    if len({t.device for t in nonzero}) == 1:  # one host read for all the leaves
        nonzero = torch.stack(nonzero).tolist()
    zero = [i for i, nz in enumerate(nonzero) if not bool(nz)]
    if not zero:
        return
    unused = [i for i in find_unused() if i in zero]
    if unused:
        paths = leaf_paths(lspec)
        names = ", ".join(paths[i] for i in unused)
        raise ValueError(
            f"hparams leaf {names} reaches neither outer_loss nor the inner problem's "
            "solution (inner_loss gradient / fixed_point), so its hypergradient is zero for "
            "a structural reason. Remove it from hparams, or check that your losses use it."
        )


def unreached(outputs: Callable[[Leaves], Sequence[Any]], lam: Sequence[torch.Tensor]) -> list[int]:
    """Indices of the ``hparams`` leaves with no autograd path to any tensor of
    ``outputs(ll)`` (called on fresh leaves ``ll`` that require grad; it builds what the
    hyperparameters may reach: the outer loss, ∇_w g, Φ, a step).  Feeds :func:`check_reached`."""
    try:
        with torch.enable_grad():
            ll = [t.detach().requires_grad_() for t in lam]
            outs = [o for o in outputs(ll) if isinstance(o, torch.Tensor) and o.requires_grad]
            if not outs:
                return list(range(len(ll)))
            grads = torch.autograd.grad(sum(o.sum() for o in outs), ll, allow_unused=True)
        return [i for i, d in enumerate(grads) if d is None]
    except RuntimeError:  # inside another transform: do not guess
        return []


def unused_hparams(outer_loss: Callable[[Any, Any], Any], inner_loss: Callable[[Any, Any], Any] | None,
                   fixed_point: Callable[[Any, Any], Any] | None, w: Sequence[torch.Tensor],
                   lam: Sequence[torch.Tensor], wspec: Any, lspec: Any) -> list[int]:
    """Indices of the ``hparams`` leaves with no autograd path to ``outer_loss`` or to the
    inner optimality map (``∇_w g``, or ``Φ``) at ``w``: the AID forms' :func:`unreached`."""

    def reached(ll: Leaves) -> list[Any]:
        wl = [t.detach().requires_grad_() for t in w]
        p, h = T.tree_unflatten(wl, wspec), T.tree_unflatten(ll, lspec)
        outs = [outer_loss(p, h)]
        if inner_loss is not None:
            return outs + list(torch.autograd.grad(inner_loss(p, h), wl, create_graph=True, allow_unused=True))
        return outs + T.tree_flatten(fixed_point(p, h))[0]  # type: ignore[misc]

    return unreached(reached, lam)


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line: the first frame outside
    this package and torch (the eager/compile wrappers add frames of their own)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def warn_unconverged(where: str, solver: str, iterations: int, residual: Any, tol: float, fix: str) -> None:
    """The one :class:`ConvergenceWarning` for a solve that stopped above its tolerance."""
    warnings.warn(
        f"{where}: {solver} stopped after {iterations} iterations with relative residual "
        f"{worst(residual) if isinstance(residual, torch.Tensor) else residual:.2e} > tol {tol:.1e}; "
        f"the result is approximate. {fix}",
        ConvergenceWarning,
        stacklevel=user_stacklevel(),
    )


_TRUNCATED_FIX = (
    "Truncated CG stopped at negative curvature: A (the inner Hessian at params) is indefinite, "
    "so the result solves the system only on the Krylov space where A was positive. Solve the "
    "inner problem further, or damp the system (hypergrad(..., damping=δ)), or use MINRES()."
)


def check_converged(where: str, info: Any, tol: float, fix: str) -> None:
    """Warn (:class:`ConvergenceWarning`) when a solve with ``tol > 0`` missed it in any row;
    ``tol = 0`` asks for exactly ``maxiter`` iterations, so there is nothing to warn about."""
    if tol > 0 and not converged_all(info.converged):
        if converged_all(~torch.as_tensor(getattr(info, "negative_curvature", False))):
            warn_unconverged(where, info.solver, info.iterations, info.residual, tol, fix)
        else:
            warn_unconverged(where, info.solver, info.iterations, info.residual, tol, _TRUNCATED_FIX)


def checked_output(
    fn: Callable[[Leaves], Leaves], like: Sequence[torch.Tensor], name: str
) -> Callable[[Leaves], Leaves]:
    """``fn`` on leaves, checked on its first call to return leaves shaped like ``like``."""
    state = {"checked": False}

    def wrapped(x: Leaves) -> Leaves:
        out = fn(x)
        if not state["checked"]:
            state["checked"] = True
            if len(out) != len(like) or any(
                not isinstance(o, torch.Tensor) or o.shape != c.shape or o.dtype != c.dtype for o, c in zip(out, like)
            ):
                raise ValueError(
                    f"{name} should return a pytree shaped like rhs, its input ({len(like)} leaves "
                    f"{[tuple(c.shape) for c in like]}), got "
                    f"{[tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in out]}"
                    f" (dtypes should be {sorted({str(c.dtype) for c in like})}, got "
                    f"{sorted({str(o.dtype) for o in out if isinstance(o, torch.Tensor)})})."
                )
        return out

    return wrapped


def explain_inference(err: RuntimeError, where: str) -> RuntimeError:
    """A clear error for tensors made under ``torch.inference_mode()`` that a user function
    captured (autograd cannot record them), or ``err`` itself."""
    if "Inference tensors" in str(err):
        return RuntimeError(
            f"{where}: a tensor created under torch.inference_mode() (e.g. data captured by "
            "your loss) cannot be used with autograd. Create it outside inference_mode, or "
            "pass tensor.clone() made outside it; torch.no_grad() is fine for data."
        )
    return err


def converged_all(converged: Any) -> bool:
    """``converged`` (a bool, or a per-row tensor under vmap) holds for every row."""
    if isinstance(converged, torch.Tensor):
        return bool(values(converged).all())
    return bool(converged)


def refuse_lost_gradient(what: str, why: str, lost: str, fix: str) -> None:
    """Raise for a tensor whose derivative an operation would drop without a word:
    ``"{what} {why}, so its {lost} would silently be zero. {fix}"``."""
    raise ValueError(f"{what} {why}, so its {lost} would silently be zero. {fix}")


# A point whose relative inner residual exceeds this is suspect by default: ‖∇_w g(w)‖/‖H w‖
# (optimality form) or ‖Φ(w) − w‖/‖w‖ (fixed-point form) estimate the relative distance of
# w to the inner solution, and the hypergradient's error grows with it (Grazzi et al., ICML
# 2020, Thm. 1).  Loose enough for honest early-stopped inner solvers.
INNER_RELATIVE_TOL = 0.05

_INNER_FORMS = {
    "inner_loss": ("‖∇_w inner_loss‖", "‖H·params‖"),
    "fixed_point": ("‖fixed_point(params) − params‖", "‖params‖"),
    "root": ("‖root(params)‖", "‖(∂_w root)·params‖"),
}


def inner_scale(w: Leaves, apply: Callable[[Leaves], Leaves] | None) -> torch.Tensor:
    """The scale an inner residual is measured against: ``‖A w‖`` (``apply`` = the IFT
    operator's ``H`` or ``∂_w F``) or ``‖w‖`` (``apply=None``), and where ``w = 0`` the same
    for a unit vector (``‖A u‖``, or 1): the answer may legitimately be 0."""
    s = T.norm(w if apply is None else apply(w))
    if bool(values(s > 0).all()):
        return s
    n = sum(t.numel() for t in w)
    unit = [torch.full_like(t, n**-0.5) for t in w]
    return torch.where(s > 0, s, torch.ones_like(s) if apply is None else T.norm(apply(unit)))


def check_inner_solution(
    where: str, form: str, residual: torch.Tensor, scale: Callable[[], torch.Tensor], inner_tol: float | None
) -> None:
    """Warn (:class:`ConvergenceWarning`) when the point the implicit function theorem is
    applied at is not an inner solution: ``residual`` (``‖∇_w g‖``, ``‖Φ(w) − w‖`` or
    ``‖F(w)‖``, per row under vmap) above ``inner_tol`` when given (``math.inf``: never),
    else ``residual / scale()`` above :data:`INNER_RELATIVE_TOL` (0.05) (``scale``: ``‖H w‖``,
    ``‖w‖`` or ``‖(∂_w F) w‖``, computed only when the residual is not zero)."""
    what, ref = _INNER_FORMS[form]
    res = residual.detach()
    fix = "the implicit function theorem assumes an exact solution. Solve the inner problem more accurately"
    if inner_tol is not None:
        if not worst(res) <= inner_tol:
            warnings.warn(f"{where}: params are not an inner solution: {what} = {worst(res):.2e} > inner_tol = "
                          f"{inner_tol:.1e}; {fix}.", ConvergenceWarning, stacklevel=user_stacklevel())
        return
    if not bool(values(res > 0).any()):
        return
    with torch.no_grad():
        s = scale().detach()
        rel = worst(torch.where(s > 0, res / torch.where(s > 0, s, torch.ones_like(s)), math.inf))
    if rel > INNER_RELATIVE_TOL:
        size = (f"is {rel:.2e} of {ref} (> {INNER_RELATIVE_TOL:g})" if rel < math.inf
                else f"= {worst(res):.2e} while {ref} = 0")
        warnings.warn(
            f"{where}: params look far from the inner solution: {what} {size}, so the result can be "
            f"far off: {fix}, or pass inner_tol= (an absolute bound on {what}; math.inf silences this).",
            ConvergenceWarning, stacklevel=user_stacklevel(),
        )


def nested_forward_mode() -> bool:
    """True when two or more forward-mode transforms (``torch.func.jvp`` / ``jacfwd``) are
    active: forward over forward.  An ``autograd.Function``'s ``jvp`` rule runs with forward
    grad off, so torch drops the outer tangent of the rule's own computation (a silently
    zero second derivative); the tensors cannot tell whether that tangent is zero."""
    if _ft is None or not hasattr(_ft, "get_interpreter_stack"):
        return False
    stack = _ft.get_interpreter_stack() or []
    return sum(str(i.key()).endswith("Jvp") for i in stack) > 1


# ----------------------------------------------------------------------------- divergence

# Growth of the step norms (geometric mean of the last quarter of the steps over the first
# and over the second quarter) that :func:`check_not_diverging` reads as divergence, and the
# fewest steps for which it reads the trend at all: with fewer than 8 steps per quarter,
# sampling noise alone makes a ×4 growth too likely.
def check_residual_trend(name: str, history: list[torch.Tensor], thresh: torch.Tensor, step: float) -> None:
    """Raise for a deterministic Richardson iteration that is not contracting (its exact
    residuals ``history``, 0-d tensors, per-row under vmap; ``thresh`` the tolerance).

    A slow divergence (spectral radius of I − step·A just above 1) stays far below the
    blow-up threshold for many iterations; read it from the residuals at exit: a row that
    missed its tolerance and grew through the whole second half of the run (or ends above
    where it started) is not contracting.  A contraction's transient growth (non-normal A)
    is a hump early on, not a rise that is still going at the end."""
    if len(history) < 8:
        return
    h = torch.stack([values(t).detach().reshape(-1) for t in history])  # (k+1, rows)
    n = h.shape[0]
    first, mid, q3, last = h[0], h[n // 2], h[(3 * n) // 4], h[-1]
    missed = last > values(thresh).reshape(-1)
    growing = missed & (((last > q3) & (q3 > mid)) | (last > first)) & (last > mid)
    # stagnation: no measurable contraction over the second half (rate ≥ 1 − 1e-4 per step,
    # e.g. an eigenvalue of modulus 1): the sum never converges, whatever maxiter
    stalled = missed & (last >= mid * (1 - 1e-4) ** (n - 1 - n // 2))
    growing = growing | stalled
    if bool(growing.any()):
        i = int(torch.argmax(torch.where(growing, last / mid.clamp(min=1e-300), 0 * last)))
        not_contraction(name, float(h[:, i].min()), float(last[i]), n - 1, step)


def not_contraction(name: str, start: float, end: float, k: int, step: float) -> NoReturn:
    """The error for a Richardson / Neumann iteration whose residual grew."""
    raise NotContractionError(
        f"{name} diverged or stagnated: the residual went from {start:.3g} to {end:.3g} "
        f"within {k} iterations, so the iteration map is not a contraction (spectral radius of "
        f"I − step·A ≥ 1, step={step:g}). For an inner_loss lower `step` (it needs "
        f"step < 2/λ_max(Hessian)) or use CG(); for a fixed_point that is not a contraction "
        f"use GMRES() or NormalCG()."
    )


TREND_GROWTH = 4.0
TREND_MIN_STEPS = 32


def check_not_diverging(norms: Sequence[torch.Tensor], iterate: Sequence[torch.Tensor], what: str, fix: str) -> None:
    """Raise :class:`NotContractionError` if an iteration diverged, judged once at its end.

    ``norms``: the norm of every step (0-d tensors kept on the device while iterating: no
    host sync per step); ``iterate``: the final iterate's leaves.  Divergence is any of

    * NaN/Inf in the iterate or in a step;
    * a last step ``DIVERGENCE_FACTOR`` times the first (a blow-up);
    * with at least ``TREND_MIN_STEPS`` steps, a clear upward trend: the geometric mean of
      the last quarter of the step norms exceeds those of the first and of the second
      quarter by ``TREND_GROWTH``, and that growth is more than 3 times the step-to-step
      scatter of ``log‖step‖`` within the quarters.  Slow divergence (``|1 − ηL| = 1.05``
      grows ×131 in 100 steps) is caught, while a contraction's steps that decay, or
      hover at the sampling-noise level (noisy minibatches, warm starts at the solution,
      decreasing steps), do not trigger it.

    Step norms below rounding level (``16·eps·‖iterate‖``) count as that level.  Under
    ``vmap`` every row is judged.  ``fix`` ends the message (what to change).
    """
    if not norms:
        return
    n = torch.stack([t.detach().reshape(()) for t in norms])
    steps = n.shape[0]
    info = torch.finfo(n.dtype)
    if not all_finite(list(iterate)) or not bool(torch.isfinite(values(n)).all()):
        raise NotContractionError(
            f"{what} diverged: NaN/Inf in the iterate after {steps} steps (the step norm went "
            f"from {worst(n[0]):.3g} to {worst(n[-1]):.3g}). {fix}"
        )
    floor = 16 * info.eps * T.norm([t.detach() for t in iterate]) + info.tiny
    n = torch.maximum(n, floor)
    bad = n[-1] > DIVERGENCE_FACTOR * n[0]
    first, last, how = n[0], n[-1], "a blow-up"
    if steps >= TREND_MIN_STEPS:
        q = steps // 4
        logs = torch.log(n)
        quarters = [logs[:q], logs[q : 2 * q], logs[2 * q : 3 * q], logs[steps - q :]]
        mean = [h.mean() for h in quarters]
        scatter = torch.stack([h.var() for h in quarters]).mean().sqrt()
        rise = mean[3] - mean[1]
        grew = (rise > math.log(TREND_GROWTH)) & (mean[3] - mean[0] > math.log(TREND_GROWTH)) & (rise > 3 * scatter)
        if bool(values(grew).any()):
            rate = torch.exp((mean[3] - mean[0]) / (steps - q))
            first, last = torch.exp(mean[0]), torch.exp(mean[3])
            how = f"geometric means of the first and last {q} steps, about ×{worst(rate):.3g} per step"
        bad = bad | grew
    if bool(values(bad).any()):
        raise NotContractionError(
            f"{what} diverged: the step norm grew from {worst(first):.3g} to {worst(last):.3g} over "
            f"{steps} steps ({how}), so the iteration is not a contraction at this step size. {fix}"
        )


def check_one_form(inner_loss: Any, fixed_point: Any) -> None:
    """Exactly one of the two forms of the inner problem (``inner_loss=`` or ``fixed_point=``)."""
    if (inner_loss is None) == (fixed_point is None):
        raise ValueError(
            "pass exactly one of fixed_point= (the fixed-point form w = Φ(w, λ), or E Φ̂(w, λ, batch)) "
            "or inner_loss= (the optimality form ∇_w g(w, λ) = 0, or ∇_w E ĝ(w, λ, batch) = 0)."
        )


# ----------------------------------------------------------------------------- nonlinear fixed points

# Growth (in log, per quarter of the run) below which a rising residual counts as flat: the
# rounding-level jitter of a converged iteration must not read as a rise.
RISE_MARGIN = 1e-2


def check_not_growing(history: Sequence[torch.Tensor], missed: torch.Tensor, what: str, fix: str) -> None:
    """Raise :class:`NotContractionError` for a nonlinear fixed-point iteration (Picard,
    Anderson) that missed its tolerance while its ABSOLUTE residual ``‖f(z) − z‖`` grew.

    ``history``: the absolute residual of every evaluation, each a ``(rows,)`` tensor (one
    entry per problem of a batch; per vmap row too), best kept at or above the rounding
    level of ``‖f(z)‖``; ``missed``: ``(rows,)`` bools, the rows that stopped above their
    tolerance.  (The relative residual ``‖f(z) − z‖/‖f(z)‖`` is no guide: for ``z ↦ 2z + 1``
    it stagnates at 0.5 while ``z`` blows up.)  A missed row is divergent when

    * its last residual is ``DIVERGENCE_FACTOR`` times its first (a blow-up), or
    * with at least 8 evaluations, it is still rising through the second half of the run:
      the mean of ``log‖f(z) − z‖`` over the quarters of the run increases from the second
      to the third to the fourth quarter (by more than ``RISE_MARGIN`` in all), and the last
      quarter lies above the first (the iteration ends further from a fixed point than it
      started).

    A slow honest contraction (a residual that decreases, however slowly) never qualifies:
    it only warns (:func:`check_converged`).  ``fix`` ends the message."""
    if not history:
        return
    h = torch.stack([t.detach() for t in history])  # (evaluations, rows)
    n = h.shape[0]
    blow = h[-1] > DIVERGENCE_FACTOR * h[0]
    how = torch.zeros_like(blow)
    bad = blow
    if n >= 8:
        q = n // 4
        logs = torch.log(h)
        m1, m2, m3, m4 = (logs[:q].mean(0), logs[q : 2 * q].mean(0), logs[2 * q : 3 * q].mean(0),
                          logs[n - q :].mean(0))
        rising = (m3 > m2) & (m4 > m3) & (m4 - m2 > RISE_MARGIN) & (m4 > m1)
        how = rising & ~blow
        bad = bad | rising
    bad = bad & missed
    if not bool(values(bad).any()):
        return
    zero = torch.zeros_like(h[0])
    start, end = worst(torch.where(bad, h[0], zero)), worst(torch.where(bad, h[-1], zero))
    kind = ("and was still rising through the second half of the run" if bool(values(how & bad).any())
            else f"(a blow-up: more than ×{DIVERGENCE_FACTOR:.0e})")
    raise NotContractionError(
        f"{what} diverged: the residual ‖f(z) − z‖ grew from {start:.3g} to {end:.3g} over {n} "
        f"evaluations {kind}, so f is not a contraction near the iterates. {fix}"
    )


def info_number(t: Any) -> Any:
    """A number field of an info dataclass: a float, but under ``vmap`` the tensor itself,
    batched or not (a vmapped function returns only tensors: a row-independent value, e.g.
    an outer loss that does not depend on the batched input, must stay a tensor too)."""
    if isinstance(t, torch.Tensor) and "Vmap" in active_transforms():
        return t
    return item(t) if isinstance(t, torch.Tensor) else t


def warn_error_above(where: str, err: Any, tol: float, iterations: int, inner_fix: str | None = None) -> None:
    """Warn (:class:`ConvergenceWarning`) when a hypergradient asked for with ``tol=`` has an
    estimated error (``err``: a :class:`bilevel.error.ErrorEstimate`) above it, naming the
    part to blame: the inner solution (more inner iterations) or the linear solve (maxiter)."""
    total, inner = worst(torch.as_tensor(err.total)), worst(torch.as_tensor(err.inner))
    if total <= tol:
        return
    linear = total - inner
    if not inner < tol and not linear > inner and inner_fix is not None:
        fix = inner_fix
    elif not inner < tol and not linear > inner:
        fix = (f"the inner error alone is estimated at {inner:.2e} >= tol, so no linear solve can meet tol with "
               "these params: solve the inner problem further (its residual should shrink about "
               f"{inner / tol:.2g}x or more), or use bilevel.hypergrad_within, which chooses the inner iterations too")
    elif not math.isfinite(total):
        fix = "the estimate is not finite (the system looks singular, or Φ not a contraction, near params)"
    else:
        fix = f"the linear solve stopped after {iterations} iterations: raise the solver's maxiter"
    warnings.warn(
        f"{where}: estimated hypergradient error {total:.2e} > tol {tol:.1e} (inner part {inner:.2e}); {fix}.",
        ConvergenceWarning, stacklevel=user_stacklevel(),
    )

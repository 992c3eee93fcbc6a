"""Forward solvers for nonlinear fixed points ``z = f(z)``: plain iteration and Anderson.

A solver is a value (a frozen dataclass of options) passed to :func:`fixed_point_solve`,
like the linear solvers of :mod:`bilevel.linear_solve`.  Both stop when the relative
residual ``‖f(z) − z‖ / ‖f(z)‖`` is ``≤ tol`` (for ``batched=True``: for every problem of
the batch) or after ``maxiter`` evaluations of ``f``; they return the iterate with the
smallest residual seen, never a point whose residual was not measured.  The solve builds
no autograd graph: differentiate the fixed point implicitly (:func:`bilevel.implicit`,
:class:`bilevel.nn.DEQ`).  Under ``torch.func.vmap`` they stop once every row is within
``tol``.

Trust (:mod:`bilevel._checks`): NaN/Inf in ``f(z)`` raises :class:`~bilevel.SolverError`; an
iteration whose absolute residual ``‖f(z) − z‖`` grows (a blow-up, or still rising through
the second half of the run) raises :class:`~bilevel.NotContractionError`; a solve that stops
above ``tol > 0`` warns (:class:`~bilevel.ConvergenceWarning`) with its residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bilevel import _tree as T
from bilevel._checks import (
    SolverError,
    all_finite,
    check_converged,
    check_count,
    check_not_growing,
    check_positive,
    check_tol,
    eager,
    item,
    values,
)
from bilevel.linear_solve import SolveInfo, _Monitor

__all__ = ["Picard", "Anderson", "FixedPointSolver", "fixed_point_solve"]


def _check(name: str, maxiter: int, tol: float) -> None:
    check_count(f"{name}: maxiter", maxiter, 1)
    check_tol(f"{name}: tol", tol)  # never a bool: tol=True would read as 1 and stop at z0


@dataclass(frozen=True)
class Picard:
    """Plain (Picard / Banach) iteration ``z ← f(z)``: error ``O(q^k)`` for a q-contraction."""

    maxiter: int = 200
    tol: float = 1e-6

    def __post_init__(self) -> None:
        _check("Picard", self.maxiter, self.tol)


@dataclass(frozen=True)
class Anderson:
    """Anderson acceleration with ``memory`` past iterates (Anderson 1965; Walker & Ni 2011).

    With residuals ``g_i = f(z_i) − z_i`` of the last ``m`` iterates, solve
    ``min_α ‖Σ α_i g_i‖`` s.t. ``Σ α_i = 1`` (``α ∝ (GGᵀ + ρI)⁻¹ 1``, ``ρ = regularization ×
    mean diag(GGᵀ)``) and step to ``z ← β Σ α_i f(z_i) + (1 − β) Σ α_i z_i`` (``β =
    mixing``).  ``memory=1`` is plain iteration (damped when ``β < 1``).
    """

    maxiter: int = 100
    tol: float = 1e-6
    memory: int = 5
    mixing: float = 1.0
    regularization: float = 1e-8

    def __post_init__(self) -> None:
        _check("Anderson", self.maxiter, self.tol)
        check_count("Anderson: memory", self.memory, 1)
        if check_positive("Anderson: mixing", self.mixing) > 1:
            raise ValueError(f"Anderson: mixing should be a float in (0, 1], not {self.mixing!r}.")
        check_tol("Anderson: regularization", self.regularization)


FixedPointSolver = Picard | Anderson


class _Run:
    """What both solvers track per evaluation ``fz = f(z)`` of (B, n) rows: the iterate with
    the smallest relative residual ``‖f(z) − z‖ / ‖f(z)‖`` (0/0 read as 0) so far — the
    methods are not monotone, so the last iterate need not be the best —, the absolute
    residual ``‖f(z) − z‖`` of every evaluation (for :func:`~bilevel._checks.check_not_growing`),
    NaN/Inf in ``f(z)``, and when to stop."""

    def __init__(self, z: torch.Tensor, tol: float, maxiter: int, where: str, name: str) -> None:
        self.mon = _Monitor(z, torch.ones((), dtype=z.dtype, device=z.device), tol)
        self.best, self.best_res = z, torch.full(z.shape[:1], math.inf, dtype=z.dtype, device=z.device)
        self.history: list[torch.Tensor] = []
        self.finite = torch.ones((), dtype=torch.bool, device=z.device)
        self.eps = torch.finfo(z.dtype).eps
        self.tiny = torch.finfo(z.dtype).tiny
        self.maxiter, self.where, self.name = maxiter, where, name

    def update(self, k: int, z: torch.Tensor, fz: torch.Tensor) -> bool:
        """Record evaluation ``k`` (1-based); True when the solve should stop."""
        num = torch.linalg.vector_norm(fz - z, dim=1)
        den = torch.linalg.vector_norm(fz, dim=1)
        res = num / torch.where(den > 0, den, torch.ones_like(den))
        # below rounding level of ‖f(z)‖ a residual is noise: count it as that level
        self.history.append(torch.maximum(num, 16 * self.eps * den + self.tiny))
        self.finite = self.finite & torch.isfinite(fz).all()
        better = res < self.best_res
        self.best = torch.where(better[:, None], z, self.best)
        self.best_res = torch.where(better, res, self.best_res)
        if k % self.mon.every == 0 or k == self.maxiter:  # a host sync: as often as the monitor's
            if not bool(values(self.finite).all()):
                raise SolverError(
                    f"{self.where}: NaN or Inf in fn(z) after {k} evaluations of {self.name}: the "
                    "fixed point would be meaningless. Check fn and the data it captures for "
                    "NaN/Inf (and z0); a map that overflows is not a contraction."
                )
        return self.mon.done(k, self.best_res.max())


def _picard(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, s: Picard, run: _Run) -> int:
    k = 0
    while k < s.maxiter:
        fz = f(z)
        k += 1
        if run.update(k, z, fz):
            break
        z = fz
    return k


def _anderson(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, s: Anderson, run: _Run) -> int:
    b, n = z.shape
    m, beta = s.memory, s.mixing
    zs = z.new_zeros(b, m, n)  # past iterates z_i
    fs = z.new_zeros(b, m, n)  # f(z_i)
    k = 0
    while k < s.maxiter:
        fz = f(z)
        slot = k % m
        zs, fs = _put(zs, slot, z), _put(fs, slot, fz)
        k += 1
        if run.update(k, z, fz):
            break
        h = min(k, m)
        g = fs[:, :h] - zs[:, :h]
        # the m×m Gram system in float64: cheap, and float32 would lose the small residuals
        gram = (g @ g.transpose(1, 2)).double()
        rho = s.regularization * gram.diagonal(dim1=1, dim2=2).mean(1) + torch.finfo(torch.float64).tiny
        eye = torch.eye(h, dtype=torch.float64, device=z.device)
        sol = torch.linalg.solve(gram + rho[:, None, None] * eye, torch.ones(b, h, 1, dtype=torch.float64,
                                                                             device=z.device))
        alpha = (sol / sol.sum(1, keepdim=True)).to(z.dtype).transpose(1, 2)  # (b, 1, h)
        z = (alpha @ fs[:, :h])[:, 0]
        if beta != 1:
            z = beta * z + (1 - beta) * (alpha @ zs[:, :h])[:, 0]
    return k


def _put(buf: torch.Tensor, slot: int, row: torch.Tensor) -> torch.Tensor:
    """``buf[:, slot] = row`` out of place (no in-place write on tensors vmap may batch)."""
    return torch.cat([buf[:, :slot], row[:, None], buf[:, slot + 1 :]], dim=1)


_FIX = {
    "Picard": "Raise maxiter, use Anderson(), or make fn more contractive",
    "Anderson": "Raise maxiter (or memory), or make fn more contractive",
}
_TOL0 = "; tol=0 asks for exactly maxiter evaluations (no warning)."
_DIVERGED = ("Make fn a contraction (‖∂f/∂z‖ < 1 near the fixed point), damp it (Anderson(mixing=0.5), "
             "or z ↦ z + η(f(z) − z)), start closer to the fixed point, or use Anderson(), which can "
             "reach a repelling fixed point. (A contraction whose iterates first grow — a strongly "
             "non-normal Jacobian — gets past such a transient with a larger maxiter.)")


@eager  # under torch.compile: runs eagerly (a graph break), never mis-traced
def fixed_point_solve(
    fn: Callable[[Any], Any],
    z0: Any,
    solver: FixedPointSolver = Anderson(),  # noqa: B008 (a frozen value, like the linear solvers)
    *,
    batched: bool = False,
) -> tuple[Any, SolveInfo]:
    """Find ``z = fn(z)`` from ``z0`` with a :class:`Picard` or :class:`Anderson` solver value.

    ``z0`` is a tensor or a pytree of tensors; ``fn`` maps it to one of the same structure.
    With ``batched=True`` the first dimension of every leaf indexes independent problems
    (a DEQ's minibatch): Anderson mixes each problem with its own coefficients and the
    tolerance must hold for each.  Returns ``(z, SolveInfo)``: ``iterations`` counts
    evaluations of ``fn``, ``residual`` is the (largest) relative residual of the returned
    ``z`` and ``converged`` whether it is ``≤ tol``.  Runs under ``torch.no_grad()``.

    Raises :class:`~bilevel.SolverError` for NaN/Inf in ``fn(z)`` and
    :class:`~bilevel.NotContractionError` when the solve misses ``tol`` while the absolute
    residual ``‖fn(z) − z‖`` grows (a ×1e6 blow-up, or a rise through the second half of
    the run: ``fn`` is not a contraction); warns (:class:`~bilevel.ConvergenceWarning`)
    when it stops above ``tol > 0`` otherwise (``tol=0`` runs exactly ``maxiter``
    evaluations and never warns).
    """
    return solve_fixed_point(fn, z0, solver, batched=batched)


@eager  # DEQ calls it directly: under torch.compile it runs eagerly too
def solve_fixed_point(
    fn: Callable[[Any], Any],
    z0: Any,
    solver: FixedPointSolver,
    *,
    batched: bool,
    where: str = "fixed_point_solve",
    fix: str | None = None,
    diverged: str = _DIVERGED,
) -> tuple[Any, SolveInfo]:
    """:func:`fixed_point_solve`, its errors and warning starting with ``where``, the
    warning ending with ``fix`` and the divergence error with ``diverged`` (what to
    change), for the library's own callers (:class:`bilevel.nn.DEQ`)."""
    if not isinstance(solver, (Picard, Anderson)):
        raise TypeError(f"solver should be bilevel.Picard() or bilevel.Anderson(), not {solver!r}.")
    leaves, spec = T.tree_flatten(z0)
    if not leaves or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves):
        raise TypeError(f"z0 should be a floating-point tensor or a pytree of them, got {T.describe(z0)}.")
    if batched and (any(t.dim() == 0 for t in leaves) or len({t.shape[0] for t in leaves}) != 1):
        raise ValueError(
            "batched=True needs every leaf of z0 to share its first (batch) dimension, got "
            f"{T.describe(z0)}."
        )
    if not all_finite(leaves):
        raise ValueError(f"{where}: z0 contains NaN or Inf; start from a finite point.")
    rows = leaves[0].shape[0] if batched else 1
    shapes = [t.shape for t in leaves]
    sizes = [t.numel() // rows for t in leaves]

    def to_rows(ls: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(rows, -1) for t in ls], dim=1)

    def from_rows(zr: torch.Tensor) -> Any:
        if len(leaves) == 1:
            return T.tree_unflatten([zr.reshape(shapes[0])], spec)
        parts = torch.split(zr, sizes, dim=1)
        return T.tree_unflatten([p.reshape(s) for p, s in zip(parts, shapes, strict=True)], spec)

    def f(zr: torch.Tensor) -> torch.Tensor:
        out = fn(from_rows(zr))
        ol, ospec = T.tree_flatten(out)
        if ospec != spec or any(
            not isinstance(o, torch.Tensor) or o.shape != s for o, s in zip(ol, shapes, strict=True)
        ):
            raise ValueError(
                f"fn(z) should return a pytree with the structure and shapes of z0 "
                f"({T.describe(z0)}), got {T.describe(out)}."
            )
        return to_rows(ol)

    name = type(solver).__name__
    with torch.no_grad():
        z = to_rows([t.detach() for t in leaves])
        run = _Run(z, solver.tol, solver.maxiter, where, name)
        k = (_picard if isinstance(solver, Picard) else _anderson)(f, z, solver, run)  # type: ignore[operator]
        res = run.best_res.max()
        floor = max(solver.tol, 64 * run.eps)  # a row at its rounding floor has nothing left to gain
        check_not_growing(run.history, run.best_res > floor, f"{where}: {name}", diverged)
    info = SolveInfo(name, k, item(res), item(res <= solver.tol))
    check_converged(where, info, solver.tol, _FIX[name] + _TOL0 if fix is None else fix)
    return from_rows(run.best), info

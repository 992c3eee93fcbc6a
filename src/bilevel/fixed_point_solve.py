"""Forward solvers for nonlinear fixed points ``z = f(z)``: plain iteration and Anderson.

A solver is a value (a frozen dataclass of options) passed to :func:`fixed_point_solve`,
like the linear solvers of :mod:`bilevel.linear_solve`.  Both stop when the relative
residual ``‖f(z) − z‖ / ‖f(z)‖`` is ``≤ tol`` (for ``batched=True``: for every problem of
the batch) or after ``maxiter`` evaluations of ``f``; they return the iterate with the
smallest residual seen, never a point whose residual was not measured.  The solve builds
no autograd graph: differentiate the fixed point implicitly (:func:`bilevel.implicit`,
:class:`bilevel.nn.DEQ`).  Under ``torch.func.vmap`` they run ``maxiter`` evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bilevel import _tree as T
from bilevel._checks import eager, item
from bilevel.linear_solve import SolveInfo, _Monitor

__all__ = ["Picard", "Anderson", "FixedPointSolver", "fixed_point_solve"]


def _check(name: str, maxiter: int, tol: float) -> None:
    if not isinstance(maxiter, int) or isinstance(maxiter, bool) or maxiter < 1:
        raise ValueError(f"{name}: maxiter should be an int >= 1, not {maxiter!r}.")
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"{name}: tol should be a finite float >= 0, not {tol!r}.")


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
        if not isinstance(self.memory, int) or isinstance(self.memory, bool) or self.memory < 1:
            raise ValueError(f"Anderson: memory should be an int >= 1, not {self.memory!r}.")
        if not (isinstance(self.mixing, (int, float)) and 0 < self.mixing <= 1):
            raise ValueError(f"Anderson: mixing should be a float in (0, 1], not {self.mixing!r}.")
        if not (isinstance(self.regularization, (int, float)) and self.regularization >= 0):
            raise ValueError(f"Anderson: regularization should be >= 0, not {self.regularization!r}.")


FixedPointSolver = Picard | Anderson


def _residual(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-problem ``‖f(z) − z‖ / ‖f(z)‖`` of (B, n) rows (0/0 read as 0)."""
    num = torch.linalg.vector_norm(fz - z, dim=1)
    den = torch.linalg.vector_norm(fz, dim=1)
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _keep_best(z: torch.Tensor, res: torch.Tensor, best: torch.Tensor, best_res: torch.Tensor):
    """Per row of the batch, the iterate with the smallest residual so far (the methods are
    not monotone, so the last iterate need not be the best)."""
    better = res < best_res
    return torch.where(better[:, None], z, best), torch.where(better, res, best_res)


def _picard(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, s: Picard):
    mon = _Monitor(z, torch.ones((), dtype=z.dtype, device=z.device), s.tol)
    best, best_res = z, torch.full(z.shape[:1], math.inf, dtype=z.dtype, device=z.device)
    k = 0
    while k < s.maxiter:
        fz = f(z)
        k += 1
        best, best_res = _keep_best(z, _residual(fz, z), best, best_res)
        if mon.done(k, best_res.max()):
            break
        z = fz
    return best, k, best_res.max()


def _anderson(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, s: Anderson):
    b, n = z.shape
    m, beta = s.memory, s.mixing
    mon = _Monitor(z, torch.ones((), dtype=z.dtype, device=z.device), s.tol)
    zs = z.new_zeros(b, m, n)  # past iterates z_i
    fs = z.new_zeros(b, m, n)  # f(z_i)
    best, best_res = z, torch.full((b,), math.inf, dtype=z.dtype, device=z.device)
    k = 0
    while k < s.maxiter:
        fz = f(z)
        slot = k % m
        zs, fs = _put(zs, slot, z), _put(fs, slot, fz)
        k += 1
        best, best_res = _keep_best(z, _residual(fz, z), best, best_res)
        if mon.done(k, best_res.max()):
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
    return best, k, best_res.max()


def _put(buf: torch.Tensor, slot: int, row: torch.Tensor) -> torch.Tensor:
    """``buf[:, slot] = row`` out of place (no in-place write on tensors vmap may batch)."""
    return torch.cat([buf[:, :slot], row[:, None], buf[:, slot + 1 :]], dim=1)


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
    """
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

    with torch.no_grad():
        z = to_rows([t.detach() for t in leaves])
        if isinstance(solver, Picard):
            z, k, res = _picard(f, z, solver)
        else:
            z, k, res = _anderson(f, z, solver)
    return from_rows(z), SolveInfo(type(solver).__name__, k, item(res), item(res <= solver.tol))

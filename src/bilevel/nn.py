"""Deep equilibrium layers: the output is a fixed point, the gradient is implicit.

:class:`DEQ` wraps a cell ``f(z, x)`` (an ``nn.Module``) and returns ``z* = f(z*, x)``
(Bai, Kolter, Koltun, NeurIPS 2019).  The forward pass finds ``z*`` with a forward
solver value (:class:`~bilevel.fixed_point_solve.Anderson` or
:class:`~bilevel.fixed_point_solve.Picard`) without building a graph; the backward pass is
the implicit function theorem in fixed-point form, ``(I − ∂_z f)ᵀ v = ∂L/∂z*`` solved with
a linear-solver value, then ``∂L/∂θ = (∂_θ f)ᵀ v`` and ``∂L/∂x = (∂_x f)ᵀ v`` — the same
code path as :func:`bilevel.implicit` and :func:`bilevel.hypergrad`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from bilevel.custom import ImplicitInfo, implicit
from bilevel.fixed_point_solve import Anderson, FixedPointSolver, solve_fixed_point
from bilevel.linear_solve import GMRES, SolveInfo, Solver, check_solver

__all__ = ["DEQ"]

_FORWARD_FIX = ("The implicit gradient assumes a fixed point. Raise maxiter, use Anderson(), or make "
                "the cell more contractive (e.g. normalise its weights).")
_FORWARD_DIVERGED = ("The cell is not a contraction in z: make it one (e.g. spectral normalisation of the "
                     "weights acting on z, ‖∂cell/∂z‖ < 1), or use Anderson(), which can reach a repelling "
                     "fixed point.")


class DEQ(nn.Module):
    """``z* = cell(z*, x)``: a deep-equilibrium layer with an implicit backward pass.

    ``cell(z, x) -> z`` is an ``nn.Module`` (a contraction in ``z`` for the forward
    solvers to converge).  ``solver`` finds the fixed point (default
    ``Anderson(maxiter=50, tol=1e-4)``), each sample of the minibatch (dim 0 of ``z``) with
    its own Anderson coefficients; ``backward_solver`` is a linear-solver value for
    ``(I − ∂_z f)ᵀ v = ∂L/∂z*`` over the whole minibatch (default ``GMRES(maxiter=50,
    tol=1e-5)``; ``FixedPoint()`` is the Neumann / "fixed-point backward" of the DEQ
    papers).  Gradients reach the cell's parameters and ``x``.

    After each call, ``forward_info`` (a :class:`~bilevel.SolveInfo`: iterations,
    relative residual ``max_b ‖f(z_b) − z_b‖/‖f(z_b)‖``, converged) describes the forward
    solve, and after each backward ``backward_info`` (an :class:`~bilevel.ImplicitInfo`)
    the linear solve.  The forward solve reports as :func:`~bilevel.fixed_point_solve`
    does, once, its messages starting with "DEQ forward": a solve that stops above its
    ``tol`` warns with its residual (:class:`~bilevel.ConvergenceWarning`; make it an error
    with ``warnings.simplefilter("error", bilevel.ConvergenceWarning)``), NaN/Inf in the
    cell's output raise :class:`~bilevel.SolverError`, and a residual ``‖f(z) − z‖`` that
    grows over the solve (a cell that is not a contraction) raises
    :class:`~bilevel.NotContractionError`.  A backward solve that stops above its ``tol``
    warns too.
    """

    def __init__(
        self,
        cell: nn.Module,
        *,
        solver: FixedPointSolver | None = None,
        backward_solver: Solver | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(cell, nn.Module):
            raise TypeError(f"DEQ: cell should be an nn.Module computing f(z, x), not {type(cell).__name__}.")
        solver = Anderson(maxiter=50, tol=1e-4) if solver is None else solver
        if not isinstance(solver, FixedPointSolver):
            raise TypeError(f"DEQ: solver should be bilevel.Anderson() or bilevel.Picard(), not {solver!r}.")
        backward_solver = GMRES(maxiter=50, tol=1e-5) if backward_solver is None else backward_solver
        check_solver(backward_solver)
        self.cell = cell
        self.solver = solver
        self.backward_solver = backward_solver
        self.forward_info: SolveInfo | None = None
        self.backward_info: ImplicitInfo | None = None

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        """The fixed point ``z*`` of ``z ↦ cell(z, x)``, from ``z0`` (default: zeros like ``x``)."""
        self.backward_info = None  # set again by this call's backward pass
        z0 = torch.zeros_like(x) if z0 is None else z0
        if not isinstance(z0, torch.Tensor) or z0.dim() == 0:
            raise ValueError("DEQ: z0 should be a tensor with a batch dimension first.")
        cell = self.cell
        weights = dict(cell.named_parameters())

        def cell_map(z: torch.Tensor, hparams: tuple[dict[str, torch.Tensor], torch.Tensor]) -> Any:
            return functional_call(cell, hparams[0], (z, hparams[1]))

        def solve_forward(z: torch.Tensor, hparams: tuple[dict[str, torch.Tensor], torch.Tensor]) -> Any:
            # hparams[0] holds the cell's own parameters (values, maybe wrapped by a
            # torch.func transform): the forward is never differentiated, so call the cell
            # directly and skip functional_call's per-iteration re-parametrisation
            x_in = hparams[1]
            # one report (a ConvergenceWarning, or an error), from the solve itself
            z_star, info = solve_fixed_point(lambda zz: cell(zz, x_in), z, self.solver, batched=True,
                                             where="DEQ forward", fix=_FORWARD_FIX,
                                             diverged=_FORWARD_DIVERGED)
            self.forward_info = info
            return z_star

        solve = implicit(fixed_point=cell_map, solver=self.backward_solver, on_backward=self._record)(solve_forward)
        return solve(z0, (weights, x))

    def _record(self, info: ImplicitInfo) -> None:
        self.backward_info = info

    def extra_repr(self) -> str:
        return f"solver={self.solver}, backward_solver={self.backward_solver}"

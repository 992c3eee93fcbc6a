"""Implicit differentiation as an autograd operation: differentiate through your own solver.

:func:`implicit` decorates any ``inner_solver(params0, hparams, *args) -> params_star``.
The solver's body runs under ``torch.no_grad()`` (no graph, no memory for its steps); the
returned ``params_star`` is attached to ``hparams`` (and to the ``*args`` marked in
``diff_args``) by a :class:`torch.autograd.Function` whose backward is the implicit
function theorem at ``params_star`` — :func:`bilevel.ift.implicit_operator` and a
linear solve, the same code as :func:`bilevel.hypergrad`.  For an optimality condition
``F(w, λ) = 0`` and a cotangent ``u = ∂f/∂w``::

    (∂_w F)ᵀ v = u,      ∂f/∂λ = −(∂_λ F)ᵀ v

with ``F = ∇_w g`` (``inner_loss``), ``F = w − Φ(w, λ)`` (``fixed_point``) or any ``F``
(``root``: KKT conditions, a projected-gradient map, ...).  The operation composes with
``loss.backward()``, ``torch.func.grad`` and ``torch.func.vmap`` (a batch of tasks); it
is the PyTorch counterpart of JAXopt's ``custom_root`` (Blondel et al., NeurIPS 2022).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bilevel import _tree as T
from bilevel._checks import ConvergenceWarning, check_finite, check_input_finite, item, leaves_pair
from bilevel.ift import check_symmetric, implicit_operator
from bilevel.linear_solve import (
    CG,
    GMRES,
    NormalCG,
    Solver,
    check_solver,
    solve_leaves,
)

__all__ = ["implicit", "ImplicitInfo", "ConvergenceWarning"]

Leaves = list[torch.Tensor]


@dataclass(frozen=True)
class ImplicitInfo:
    """What one backward pass of an :func:`implicit` solver did.

    ``iterations``, ``residual`` (relative, ``‖u − (∂_w F)ᵀ v‖/‖u‖``) and ``converged``: of
    the linear solve ``(∂_w F)ᵀ v = u``.  ``inner_residual``: ``‖F(params_star, λ)‖``, i.e.
    ``‖∇_w g‖``, ``‖Φ(w, λ) − w‖`` or ``‖root‖`` — how far the solver's output is from
    satisfying the optimality condition the gradient assumes.  Under ``vmap`` the float
    and bool fields are batched tensors.
    """

    solver: str
    iterations: int
    residual: float | torch.Tensor
    converged: bool | torch.Tensor
    inner_residual: float | torch.Tensor


@dataclass(frozen=True)
class _Plan:
    """Everything non-tensor the autograd.Function needs, fixed at call time."""

    inner_solver: Callable[..., Any]
    form: str  # "inner_loss" | "fixed_point" | "root"
    condition: Callable[..., Any]
    solver: Solver
    inner_tol: float | None
    on_backward: Callable[[ImplicitInfo], Any] | None
    wspec: Any
    lspec: Any
    n_w: int
    n_lam: int
    args_spec: Any
    # per leaf of the flattened *args: None for a tensor (it travels through apply), else the
    # static object itself
    static_leaves: tuple[Any, ...]
    marked: tuple[bool, ...]  # per tensor leaf of *args: differentiable (in diff_args)?

    def rebuild_args(self, tensor_leaves: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        it = iter(tensor_leaves)
        leaves = [next(it) if s is None else s for s in self.static_leaves]
        return tuple(T.tree_unflatten(leaves, self.args_spec))


def _unpack(plan: _Plan, leaves: Sequence[torch.Tensor]) -> tuple[Leaves, Leaves, Leaves]:
    w = list(leaves[: plan.n_w])
    lam = list(leaves[plan.n_w : plan.n_w + plan.n_lam])
    return w, lam, list(leaves[plan.n_w + plan.n_lam :])


class _Implicit(torch.autograd.Function):
    # forward and backward are plain functions of tensors, so torch.func.vmap batches them
    # as they are (meta-learning: one inner problem per task).
    generate_vmap_rule = True

    @staticmethod
    def forward(plan: _Plan, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        # detached: a solver that takes gradients inside (torch.enable_grad() + backward)
        # must not accumulate them into the caller's tensors
        w0, lam, targs = _unpack(plan, [t.detach() for t in leaves])
        params0 = T.tree_unflatten(w0, plan.wspec)
        hparams = T.tree_unflatten(lam, plan.lspec)
        with torch.no_grad():  # the inner solver's steps are never differentiated
            out = plan.inner_solver(params0, hparams, *plan.rebuild_args(targs))
        w, ospec = T.tree_flatten(out)
        if ospec != plan.wspec or any(
            not isinstance(o, torch.Tensor) or o.shape != x.shape or o.dtype != x.dtype
            for o, x in zip(w, w0, strict=True)
        ):
            raise ValueError(
                "the inner solver should return params_star with the structure, shapes and "
                f"dtypes of params0 ({T.describe(params0)}), got {T.describe(out)}."
            )
        check_finite(w, "the inner solver's output params_star")
        # clone: an output must not alias an input (a solver may return params0 unchanged)
        return tuple(t.detach().clone() for t in w)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        plan = inputs[0]
        ctx.plan = plan
        ctx.save_for_backward(*inputs[1 + plan.n_w :], *output)

    @staticmethod
    def backward(ctx: Any, *cotangent: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: _Plan = ctx.plan
        saved = list(ctx.saved_tensors)
        lam, targs, w = saved[: plan.n_lam], saved[plan.n_lam : -plan.n_w], saved[-plan.n_w :]
        marked = [i for i, m in enumerate(plan.marked) if m]
        theta = lam + [targs[i] for i in marked]  # what the gradient is taken with respect to
        _, theta_spec = T.tree_flatten(theta)

        def condition(params: Any, theta_leaves: Leaves) -> Any:
            hparams = T.tree_unflatten(list(theta_leaves[: plan.n_lam]), plan.lspec)
            args = list(targs)
            for i, t in zip(marked, theta_leaves[plan.n_lam :], strict=True):
                args[i] = t
            return plan.condition(params, hparams, *plan.rebuild_args(args))

        op = implicit_operator(w, theta, plan.wspec, theta_spec, **{plan.form: condition})
        check_symmetric(plan.solver, op, w, plan.form)
        rmatvec = op.rmatvec if isinstance(plan.solver, NormalCG) else None
        v, sinfo = solve_leaves(op.matvec, list(cotangent), plan.solver, None, rmatvec)
        check_finite(v, f"the linear-system solution v ({sinfo.solver}, {sinfo.iterations} iterations)")
        grads = op.cross(v)
        check_finite(grads, "the implicit gradient")
        info = ImplicitInfo(sinfo.solver, sinfo.iterations, sinfo.residual, sinfo.converged,
                            item(op.inner_residual))
        _warn_if_inaccurate(plan, info)
        if plan.on_backward is not None:
            plan.on_backward(info)
        arg_grads: list[torch.Tensor | None] = [None] * len(targs)
        for i, g in zip(marked, grads[plan.n_lam :], strict=True):
            arg_grads[i] = g
        return (None, *([None] * plan.n_w), *grads[: plan.n_lam], *arg_grads)


def _warn_if_inaccurate(plan: _Plan, info: ImplicitInfo) -> None:
    # tol=0 asks for exactly maxiter iterations: nothing to warn about
    if info.converged is False and getattr(plan.solver, "tol", 1.0) > 0:
        warnings.warn(
            f"implicit backward: {info.solver} stopped after {info.iterations} iterations with "
            f"relative residual {info.residual:.2e} > tol {getattr(plan.solver, 'tol', 0):.1e}; "
            "the gradient is approximate. Raise the solver's maxiter, or pick another solver.",
            ConvergenceWarning,
            stacklevel=2,
        )
    res = info.inner_residual
    if plan.inner_tol is not None and not isinstance(res, torch.Tensor) and not res <= plan.inner_tol:
        warnings.warn(
            f"implicit backward: the inner solver's output is not a solution: ‖{plan.form} "
            f"residual‖ = {res:.2e} > inner_tol = {plan.inner_tol:.1e}; the implicit gradient "
            "assumes an exact solution. Solve the inner problem more accurately.",
            ConvergenceWarning,
            stacklevel=2,
        )


def implicit(
    *,
    inner_loss: Callable[..., torch.Tensor] | None = None,
    fixed_point: Callable[..., Any] | None = None,
    root: Callable[..., Any] | None = None,
    solver: Solver | None = None,
    diff_args: Sequence[int] = (),
    inner_tol: float | None = None,
    on_backward: Callable[[ImplicitInfo], Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``inner_solver(params0, hparams, *args) -> params_star`` with its implicit gradient.

    Give the optimality condition that ``params_star`` satisfies, exactly one of

    * ``inner_loss(params, hparams, *args)``: a scalar ``g``; ``params_star = argmin_w g``
      (``∇_w g = 0``, system ``H v = u`` with the symmetric Hessian);
    * ``fixed_point(params, hparams, *args)``: ``Φ`` shaped like ``params``;
      ``params_star = Φ(params_star, λ)`` (system ``(I − ∂_wΦ)ᵀ v = u``);
    * ``root(params, hparams, *args)``: ``F`` shaped like ``params``; ``F(params_star, λ) = 0``
      (system ``(∂_w F)ᵀ v = u``, not symmetric in general: KKT conditions, a projected
      gradient map ``w − proj(w − η∇g)``).

    The conditions receive the same ``*args`` as the solver (the task's data, a module).
    ``solver`` is a linear-solver value; default ``CG()`` for ``inner_loss`` and
    ``GMRES()`` for ``fixed_point``/``root`` (CG/MINRES on a non-symmetric system is
    refused with a ``ValueError`` at backward).  ``diff_args``: indices into ``*args`` of
    tensors (or pytrees of tensors) that also get the implicit gradient; any other tensor
    argument that requires grad is refused (its gradient would silently be lost).
    ``params0`` never gets a gradient: by the IFT the solution does not depend on the start.

    The solver body runs under ``torch.no_grad()``: take gradients inside it with
    ``torch.func.grad`` (works there) or wrap the body in ``torch.enable_grad()``.

    Backward warns (:class:`ConvergenceWarning`) when the linear solve stops above its
    tolerance and, with ``inner_tol`` set, when ``‖F(params_star)‖ > inner_tol``;
    ``on_backward(info)`` receives an :class:`ImplicitInfo` after each backward.  NaN/Inf in
    ``hparams`` or in the solver's output raise.  Hypergradients of hypergradients
    (``create_graph=True``) differentiate through the backward's linear solve: exact with
    ``Dense()``, as accurate as the solve otherwise.  Forward mode (``torch.func.jvp``) is
    not supported.  Under ``torch.func.vmap`` the checks that need data are skipped and
    iterative solvers run ``maxiter`` iterations.
    """
    forms = {"inner_loss": inner_loss, "fixed_point": fixed_point, "root": root}
    given = [k for k, fn in forms.items() if fn is not None]
    if len(given) != 1:
        raise ValueError(
            "implicit: pass exactly one of inner_loss= (∇_w g = 0), fixed_point= "
            f"(w = Φ(w, λ)) or root= (F(w, λ) = 0), got {given or 'none'}."
        )
    form = given[0]
    condition = forms[form]
    if not callable(condition):
        raise TypeError(f"implicit: {form} should be a function (params, hparams, *args), not {condition!r}.")
    if solver is None:
        solver = CG() if form == "inner_loss" else GMRES()
    check_solver(solver)
    marked_args = _check_diff_args(diff_args)
    if inner_tol is not None and not (isinstance(inner_tol, (int, float)) and inner_tol >= 0):
        raise ValueError(f"implicit: inner_tol should be None or a float >= 0, not {inner_tol!r}.")

    def decorate(inner_solver: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(inner_solver):
            raise TypeError(f"implicit(...) decorates a function, not {inner_solver!r}.")

        @functools.wraps(inner_solver)
        def solve(params0: Any, hparams: Any, *args: Any) -> Any:
            (w0, wspec), (lam, lspec) = leaves_pair(params0, hparams, "params0")
            check_input_finite(lam, "hparams")
            targs, static, marked, args_spec = _split_args(args, marked_args)
            plan = _Plan(inner_solver, form, condition, solver, inner_tol, on_backward,
                         wspec, lspec, len(w0), len(lam), args_spec, static, marked)
            out = _Implicit.apply(plan, *w0, *lam, *targs)
            return T.tree_unflatten(list(out), wspec)

        return solve

    return decorate


def _check_diff_args(diff_args: Sequence[int]) -> frozenset[int]:
    if isinstance(diff_args, int) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in diff_args
    ):
        raise TypeError(
            f"implicit: diff_args should be a tuple of indices into *args (ints >= 0), "
            f"not {diff_args!r}; e.g. diff_args=(0,) for the first extra argument."
        )
    return frozenset(diff_args)


def _split_args(
    args: tuple[Any, ...], marked_args: frozenset[int]
) -> tuple[Leaves, tuple[Any, ...], tuple[bool, ...], Any]:
    """Tensor leaves of ``*args`` (they go through apply, so vmap sees them), the rest static."""
    if marked_args and max(marked_args) >= len(args):
        raise ValueError(
            f"implicit: diff_args={sorted(marked_args)} names an argument the solver was not "
            f"given: it was called with {len(args)} extra argument(s) after (params0, hparams)."
        )
    tensors: Leaves = []
    static: list[Any] = []
    marked: list[bool] = []
    for i, arg in enumerate(args):
        leaves, _ = T.tree_flatten(arg)
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                if i in marked_args:
                    raise TypeError(
                        f"implicit: args[{i}] is in diff_args, so it should be a tensor or a "
                        f"pytree of tensors; it holds a {type(leaf).__name__}."
                    )
                static.append(leaf)
                continue
            if i in marked_args and not leaf.is_floating_point():
                raise TypeError(f"implicit: args[{i}] is in diff_args but holds a {leaf.dtype} tensor.")
            if i not in marked_args and leaf.requires_grad and torch.is_grad_enabled():
                raise ValueError(
                    f"implicit: args[{i}] requires grad but is not in diff_args, so its "
                    f"gradient would silently be zero. Mark it with diff_args=({i},) or pass "
                    f"it detached."
                )
            tensors.append(leaf)
            static.append(None)
            marked.append(i in marked_args)
    _, spec = T.tree_flatten(tuple(args))
    return tensors, tuple(static), tuple(marked), spec

"""Implicit differentiation as an autograd operation: differentiate through your own solver.

:func:`implicit` decorates any ``inner_solver(params0, hparams, *args, **kwargs) ->
params_star``.  The solver's body runs under ``torch.no_grad()`` (no graph, no memory for
its steps); the returned ``params_star`` is attached to ``hparams`` (and to the ``*args``
marked in ``diff_args``) by a :class:`torch.autograd.Function` whose derivatives are the
implicit function theorem at ``params_star`` — :func:`bilevel.ift.implicit_operator` and a
linear solve, the same code as :func:`bilevel.hypergrad`.  For an optimality condition
``F(w, θ) = 0``::

    reverse mode (cotangent u = ∂f/∂w):   (∂_w F)ᵀ v = u,        ∂f/∂θ = −(∂_θ F)ᵀ v
    forward mode (tangent θ̇):             (∂_w F) ẇ = −(∂_θ F) θ̇

with ``F = ∇_w g`` (``inner_loss``), ``F = w − Φ(w, θ)`` (``fixed_point``) or any ``F``
(``root``: KKT conditions, a projected-gradient map, ...).  The operation composes with
``loss.backward()``, ``torch.func.grad``/``jacrev``, ``torch.func.jvp``/``jacfwd``,
``torch.func.hessian`` and ``torch.func.vmap`` (a batch of tasks); it is the PyTorch
counterpart of JAXopt's ``custom_root`` (Blondel et al., NeurIPS 2022).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad as func_grad
from torch.func import jvp as func_jvp

from bilevel import _tree as T
from bilevel._checks import (
    ConvergenceWarning,
    check_converged,
    check_finite,
    check_inner_solution,
    check_input_finite,
    check_shaped_like,
    check_tol,
    info_pytree,
    inner_scale,
    item,
    leaves_pair,
    nested_forward_mode,
    no_transform,
    refuse_lost_gradient,
    scalar,
    values,
)
from bilevel.error import AIDError, ErrorEstimate
from bilevel.ift import ImplicitOperator, check_symmetric, implicit_operator
from bilevel.linear_solve import (
    CG,
    GMRES,
    NormalCG,
    SolveInfo,
    Solver,
    check_solver,
    solve_leaves,
)

__all__ = ["implicit", "ImplicitInfo", "ConvergenceWarning"]

Leaves = list[torch.Tensor]
_OUTPUT = object()  # marks an aux leaf that is a tensor output of the autograd.Function


@functools.partial(info_pytree, static=("solver", "iterations"))  # returnable under vmap
@dataclass(frozen=True)
class ImplicitInfo:
    """What one backward pass of an :func:`implicit` solver did.

    ``iterations``, ``residual`` (relative, ``‖u − (∂_w F)ᵀ v‖/‖u‖``) and ``converged``: of
    the linear solve ``(∂_w F)ᵀ v = u``.  ``inner_residual``: ``‖F(params_star, λ)‖``, i.e.
    ``‖∇_w g‖``, ``‖Φ(w, λ) − w‖`` or ``‖root‖`` — how far the solver's output is from
    satisfying the optimality condition the gradient assumes.  With ``estimate=True``:
    ``error_estimate`` estimates an upper bound on the error of the vector–Jacobian product
    ``uᵀ dw*/dθ`` the backward returned, for the cotangent ``u`` it received (inner and
    linear-system parts, :mod:`bilevel.error`); ``contraction`` and ``error`` as in
    :class:`~bilevel.HypergradInfo`; else ``None``.  Under ``vmap`` the float and bool
    fields are batched tensors.
    """

    solver: str
    iterations: int
    residual: float | torch.Tensor
    converged: bool | torch.Tensor
    inner_residual: float | torch.Tensor
    error_estimate: float | torch.Tensor | None = None
    contraction: float | torch.Tensor | None = None
    error: ErrorEstimate | None = None


@dataclass(frozen=True)
class _Plan:
    """Everything non-tensor the autograd.Function needs, fixed at call time."""

    inner_solver: Callable[..., Any]
    form: str  # "inner_loss" | "fixed_point" | "root"
    condition: Callable[..., Any]
    solver: Solver
    inner_tol: float | None
    on_backward: Callable[[ImplicitInfo], Any] | None
    estimate: bool
    has_aux: bool
    wspec: Any
    lspec: Any
    n_w: int
    n_lam: int
    # (key, spec) per extra argument: key an int for *args, a str for **kwargs
    arg_specs: tuple[tuple[int | str, Any], ...]
    # per leaf of the flattened (*args, **kwargs): None for a tensor (it travels through
    # apply, so vmap sees it), else the static object itself
    static_leaves: tuple[Any, ...]
    marked: tuple[bool, ...]  # per tensor leaf of (*args, **kwargs): in diff_args?
    names: tuple[str, ...]  # per tensor leaf: "args[i]" or "kwargs['k']", for messages
    # written by forward: [aux spec, aux leaves with _OUTPUT where a tensor travels as output]
    aux_box: list[Any] = field(default_factory=list, compare=False)

    def rebuild_args(self, tensor_leaves: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        it = iter(tensor_leaves)
        leaves = iter([next(it) if s is None else s for s in self.static_leaves])
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for key, spec in self.arg_specs:
            value = T.tree_unflatten([next(leaves) for _ in range(spec.num_leaves)], spec)
            if isinstance(key, str):
                kwargs[key] = value
            else:
                args.append(value)
        return tuple(args), kwargs


def _unpack(plan: _Plan, leaves: Sequence[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    w = list(leaves[: plan.n_w])
    lam = list(leaves[plan.n_w : plan.n_w + plan.n_lam])
    return w, lam, list(leaves[plan.n_w + plan.n_lam :])


def _saved(plan: _Plan, saved: Sequence[torch.Tensor]) -> tuple[Leaves, Leaves, Leaves]:
    """(λ leaves, tensor leaves of the extra arguments, params_star leaves) from the ctx."""
    saved = list(saved)
    return saved[: plan.n_lam], saved[plan.n_lam : -plan.n_w], saved[-plan.n_w :]


def _operator(plan: _Plan, lam: Leaves, targs: Leaves, w: Leaves) -> tuple[ImplicitOperator, Leaves, list[int], Any]:
    """The IFT operator at ``params_star`` with θ = λ + the marked argument leaves; also
    returns θ, the marked indices and ``condition(params, θ leaves)``."""
    marked = [i for i, m in enumerate(plan.marked) if m]
    theta = lam + [targs[i] for i in marked]  # what the derivative is taken with respect to
    _, theta_spec = T.tree_flatten(theta)

    def condition(params: Any, theta_leaves: Leaves) -> Any:
        hparams = T.tree_unflatten(list(theta_leaves[: plan.n_lam]), plan.lspec)
        leaves = list(targs)
        for i, t in zip(marked, theta_leaves[plan.n_lam :], strict=True):
            leaves[i] = t
        args, kwargs = plan.rebuild_args(leaves)
        return plan.condition(params, hparams, *args, **kwargs)

    op = implicit_operator(w, theta, plan.wspec, theta_spec, **{plan.form: condition})
    check_symmetric(plan.solver, op, w, plan.form)
    return op, theta, marked, condition


class _Implicit(torch.autograd.Function):
    # forward, backward and jvp are plain functions of tensors, so torch.func.vmap batches
    # them as they are (meta-learning: one inner problem per task).
    generate_vmap_rule = True

    @staticmethod
    def forward(plan: _Plan, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        # detached: a solver that takes gradients inside (torch.enable_grad() + backward)
        # must not accumulate them into the caller's tensors
        w0, lam, targs = _unpack(plan, [t.detach() for t in leaves])
        params0 = T.tree_unflatten(w0, plan.wspec)
        hparams = T.tree_unflatten(lam, plan.lspec)
        args, kwargs = plan.rebuild_args(targs)
        with torch.no_grad():  # the inner solver's steps are never differentiated
            out = plan.inner_solver(params0, hparams, *args, **kwargs)
        aux: Any = None
        if plan.has_aux:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise ValueError(
                    "implicit(has_aux=True): the inner solver should return a pair "
                    f"(params_star, aux), got {T.describe(out)}."
                )
            out, aux = out
        w, ospec = T.tree_flatten(out)
        if ospec != plan.wspec or any(
            not isinstance(o, torch.Tensor) or o.shape != x.shape or o.dtype != x.dtype
            for o, x in zip(w, w0, strict=True)
        ):
            raise ValueError(
                "the inner solver should return params_star with the structure, shapes and "
                f"dtypes of params0 ({T.describe(params0)}), got {T.describe(out)}"
                + (" (with has_aux=True: the first of the pair)." if plan.has_aux else
                   ". If it also returns extra outputs, pass has_aux=True.")
            )
        check_finite(w, "the inner solver's output params_star")
        aux_leaves, aux_spec = T.tree_flatten(aux)
        plan.aux_box[:] = [aux_spec, [_OUTPUT if isinstance(a, torch.Tensor) else a for a in aux_leaves]]
        # clone: an output must not alias an input (a solver may return params0 unchanged)
        return tuple(t.detach().clone() for t in w) + tuple(
            a.detach().clone() for a in aux_leaves if isinstance(a, torch.Tensor)
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        plan = inputs[0]
        ctx.plan = plan
        ctx.n_out = len(output)
        saved = (*inputs[1 + plan.n_w :], *output[: plan.n_w])
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)  # the same tensors: the vmap rule keeps one set of bdims
        ctx.mark_non_differentiable(*output[plan.n_w :])  # aux

    @staticmethod
    def backward(ctx: Any, *cotangent: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: _Plan = ctx.plan
        lam, targs, w = _saved(plan, ctx.saved_tensors)
        cot = [torch.zeros_like(x) if c is None else c for c, x in zip(cotangent[: plan.n_w], w, strict=True)]
        op, _, marked, _ = _operator(plan, lam, targs, w)
        rmatvec = op.rmatvec if isinstance(plan.solver, NormalCG) else None
        lanczos: list = []  # CG's coefficients: Ritz values for the estimate, free
        v, sinfo = solve_leaves(op.matvec, cot, plan.solver, None, rmatvec, None, lanczos if plan.estimate else None)
        check_finite(v, f"the linear-system solution v ({sinfo.solver}, {sinfo.iterations} iterations)")
        grads = op.cross(v)
        check_finite(grads, "the implicit gradient")
        err = None
        if plan.estimate:  # the VJP's error for this cotangent: u is fixed, so ∇_λ f ≡ 0 and ∇_w f ≡ u
            zeros = T.zeros_like(grads)
            err = AIDError(op, lambda w2: _operator(plan, lam, targs, w2)[0], lambda w2: (cot, zeros), w, cot,
                           zeros, plan.form == "inner_loss", root=plan.form == "root")(v, grads, lanczos)
        info = ImplicitInfo(sinfo.solver, sinfo.iterations, sinfo.residual, sinfo.converged,
                            item(op.inner_residual), None if err is None else err.total,
                            None if err is None else err.contraction, err)
        _warn_if_inaccurate(plan, sinfo, op, w, "implicit backward")
        if plan.on_backward is not None:
            plan.on_backward(info)
        arg_grads: list[torch.Tensor | None] = [None] * len(targs)
        for i, g in zip(marked, grads[plan.n_lam :], strict=True):
            arg_grads[i] = g
        return (None, *([None] * plan.n_w), *grads[: plan.n_lam], *arg_grads)

    @staticmethod
    def jvp(ctx: Any, *tangent: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        # (∂_w F) ẇ = −(∂_θ F) θ̇ at params_star; params0's tangent is ignored (the solution
        # does not depend on the start), an unmarked argument's tangent is refused
        plan: _Plan = ctx.plan
        if no_transform():  # torch.autograd.forward_ad: it cannot nest the jvps used below
            raise NotImplementedError(
                "implicit: forward mode through torch.autograd.forward_ad dual tensors is not "
                "supported; use torch.func.jvp or torch.func.jacfwd (or reverse mode)."
            )
        lam, targs, w = _saved(plan, ctx.saved_tensors)
        if nested_forward_mode():
            raise NotImplementedError(
                "implicit: forward mode over forward mode (a torch.func.jvp/jacfwd inside "
                "another, e.g. jacfwd(jacfwd(f))) is not supported: torch drops the outer "
                "tangent inside an autograd.Function's jvp rule, so the result would silently "
                "be wrong. Use torch.func.hessian (jacfwd over jacrev) or jacrev over jacfwd."
            )
        _, dlam, dtargs = _unpack(plan, tangent[1:])
        for name, m, d in zip(plan.names, plan.marked, dtargs, strict=True):
            if d is not None and not m and bool(values(d).any()):  # zeros: a non-dual input
                refuse_lost_gradient(f"implicit: {name}", f"carries a forward-mode tangent but {_why(name)}",
                                     "derivative", _fix(name))
        aux_out: list[None] = [None] * (ctx.n_out - plan.n_w)
        marked = [i for i, m in enumerate(plan.marked) if m]
        dtheta_given = dlam + [dtargs[i] for i in marked]
        if all(d is None for d in dtheta_given):
            return (*T.zeros_like(w), *aux_out)
        op, theta, _, condition = _operator(plan, lam, targs, w)
        dtheta = [torch.zeros_like(t) if d is None else d for t, d in zip(theta, dtheta_given, strict=True)]
        F = _condition_leaves(plan, condition, w)
        _, dF = func_jvp(lambda th: F(w, th), (theta,), (dtheta,))
        rhs = [-t for t in dF]
        # the transposed system: matvec (∂_w F)·, and NormalCG's rmatvec (∂_w F)ᵀ·
        rmatvec = op.matvec if isinstance(plan.solver, NormalCG) else None
        wdot, sinfo = solve_leaves(op.rmatvec, rhs, plan.solver, None, rmatvec)
        check_finite(wdot, f"the forward-mode tangent ({sinfo.solver}, {sinfo.iterations} iterations)")
        _warn_if_inaccurate(plan, sinfo, op, w, "implicit jvp")
        return (*wdot, *aux_out)


def _condition_leaves(plan: _Plan, condition: Callable[..., Any], w: Leaves) -> Callable[[Leaves, Leaves], Leaves]:
    """``F(w, θ)`` on leaves: ``∇_w g``, ``w − Φ(w, θ)`` or the root function."""

    def raw(wl: Leaves, th: Leaves) -> Any:
        return condition(T.tree_unflatten(list(wl), plan.wspec), th)

    if plan.form == "inner_loss":
        return func_grad(lambda wl, th: scalar(raw(wl, th), "inner_loss"))

    def F(wl: Leaves, th: Leaves) -> Leaves:
        out, ospec = T.tree_flatten(raw(wl, th))
        check_shaped_like(out, ospec, w, plan.wspec, f"{plan.form}(params, hparams)")
        return T.sub(wl, out) if plan.form == "fixed_point" else out

    return F


def _warn_if_inaccurate(plan: _Plan, sinfo: SolveInfo, op: Any, w: Leaves, where: str) -> None:
    """The trust policy's warnings, every vmap row read (one row off is enough to warn)."""
    check_converged(where, sinfo, getattr(plan.solver, "tol", 0.0),
                    "Raise the solver's maxiter, or pick another solver.")
    apply = {"inner_loss": op.matvec, "fixed_point": None, "root": op.rmatvec}[plan.form]
    check_inner_solution(where, plan.form, op.inner_residual, lambda: inner_scale(w, apply), plan.inner_tol)


def implicit(
    *,
    inner_loss: Callable[..., torch.Tensor] | None = None,
    fixed_point: Callable[..., Any] | None = None,
    root: Callable[..., Any] | None = None,
    solver: Solver | None = None,
    diff_args: Sequence[int] = (),
    has_aux: bool = False,
    inner_tol: float | None = None,
    on_backward: Callable[[ImplicitInfo], Any] | None = None,
    estimate: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``inner_solver(params0, hparams, *args, **kwargs) -> params_star`` with its implicit derivatives.

    Give the optimality condition that ``params_star`` satisfies, exactly one of

    * ``inner_loss(params, hparams, *args, **kwargs)``: a scalar ``g``;
      ``params_star = argmin_w g`` (``∇_w g = 0``, system ``H v = u`` with the symmetric
      Hessian);
    * ``fixed_point(params, hparams, *args, **kwargs)``: ``Φ`` shaped like ``params``;
      ``params_star = Φ(params_star, λ)`` (system ``(I − ∂_wΦ)ᵀ v = u``);
    * ``root(params, hparams, *args, **kwargs)``: ``F`` shaped like ``params``;
      ``F(params_star, λ) = 0`` (system ``(∂_w F)ᵀ v = u``, not symmetric in general: KKT
      conditions, a projected gradient map ``w − proj(w − η∇g)``).

    The conditions receive the same ``*args`` and ``**kwargs`` as the solver (the task's
    data, a module, options).  ``solver`` is a linear-solver value; default ``CG()`` for
    ``inner_loss`` and ``GMRES()`` for ``fixed_point``/``root`` (CG/MINRES on a
    non-symmetric system is refused with a ``ValueError``).  ``diff_args``: indices into
    ``*args`` of tensors (or pytrees of tensors) that also get the implicit derivative;
    any other tensor argument — positional or keyword — that requires grad (or carries a
    ``torch.func.jvp`` tangent) is refused, as its derivative would silently be zero.
    Tensor leaves of ``*args`` and ``**kwargs`` are inputs of the operation, so
    ``torch.func.vmap`` batches them; keyword arguments are never differentiated.
    ``params0`` never gets a derivative: by the IFT the solution does not depend on the
    start.

    ``has_aux=True``: the solver returns ``(params_star, aux)`` and so does the decorated
    function; ``aux`` (any pytree: iteration counts, a loss) is passed through
    undifferentiated — its tensors detached.  Under ``vmap`` its tensor leaves are batched
    like any output; its non-tensor leaves are what the (one, batched) solver call
    returned, and ``vmap`` itself refuses a function that returns them, so return only
    tensors from a vmapped function.

    The solver body runs under ``torch.no_grad()``: take gradients inside it with
    ``torch.func.grad`` (works there) or wrap the body in ``torch.enable_grad()``.

    Reverse mode (``backward``, ``torch.func.grad``/``vjp``/``jacrev``) solves
    ``(∂_w F)ᵀ v = u``; forward mode (``torch.func.jvp``/``jacfwd``, and
    ``torch.func.hessian`` = ``jacfwd(jacrev)``) solves ``(∂_w F) ẇ = −(∂_θ F) θ̇`` with the
    same ``solver`` (for ``fixed_point``/``root`` on the transposed operator).  Derivatives
    of derivatives (``create_graph=True``, ``hessian``) differentiate through the linear
    solve: exact with ``Dense()``, as accurate as the solve otherwise.

    Each linear solve warns (:class:`ConvergenceWarning`) when it stops above its
    tolerance, and when ``params_star`` is not a solution: ``‖F(params_star)‖ > inner_tol``
    if set, else a relative residual (``‖∇_w g‖/‖H w‖``, ``‖Φ(w) − w‖/‖w‖``) above 0.05
    (``inner_tol=math.inf`` silences it); under ``vmap`` when any task of the batch does.
    ``on_backward(info)`` receives an :class:`ImplicitInfo` after each backward (not after
    forward-mode solves); with ``estimate=True`` it carries an a-posteriori estimate of the
    backward's error (13–31 extra products per backward; :mod:`bilevel.error`).  NaN/Inf in
    ``hparams``, in the solver's output or in a derivative raise.
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
    if not isinstance(has_aux, bool):
        raise TypeError(f"implicit: has_aux should be True or False, not {has_aux!r}.")
    if not isinstance(estimate, bool):
        raise TypeError(f"implicit: estimate should be True or False, not {estimate!r}.")
    if estimate and on_backward is None:
        raise ValueError("implicit(estimate=True): the estimate is delivered on the ImplicitInfo passed to "
                         "on_backward=; give on_backward (e.g. infos.append).")
    if inner_tol is not None and inner_tol != math.inf:  # inf: no inner-residual warning at all
        check_tol("implicit: inner_tol", inner_tol)

    def decorate(inner_solver: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(inner_solver):
            raise TypeError(f"implicit(...) decorates a function, not {inner_solver!r}.")

        @functools.wraps(inner_solver)
        def solve(params0: Any, hparams: Any, *args: Any, **kwargs: Any) -> Any:
            (w0, wspec), (lam, lspec) = leaves_pair(params0, hparams, "params0")
            check_input_finite(lam, "hparams")
            targs, static, marked, names, specs = _split_args(args, kwargs, marked_args)
            plan = _Plan(inner_solver, form, condition, solver, inner_tol, on_backward, estimate, has_aux,
                         wspec, lspec, len(w0), len(lam), specs, static, marked, names)
            out = _Implicit.apply(plan, *w0, *lam, *targs)
            params_star = T.tree_unflatten(list(out[: len(w0)]), wspec)
            if not has_aux:
                return params_star
            aux_spec, aux_leaves = plan.aux_box
            it = iter(out[len(w0) :])
            aux = [next(it).detach() if a is _OUTPUT else a for a in aux_leaves]
            return params_star, T.tree_unflatten(aux, aux_spec)

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


def _why(name: str) -> str:
    return "keyword arguments are not differentiated" if name.startswith("kwargs") else "is not in diff_args"


def _fix(name: str) -> str:
    if name.startswith("kwargs"):
        return "Pass it as a positional arg in diff_args, or detached."
    i = name[len("args[") : -1]
    return f"Pass it as a positional arg in diff_args (diff_args=({i},)), or detached."


def _split_args(
    args: tuple[Any, ...], kwargs: dict[str, Any], marked_args: frozenset[int]
) -> tuple[Leaves, tuple[Any, ...], tuple[bool, ...], tuple[str, ...], tuple[tuple[int | str, Any], ...]]:
    """Tensor leaves of ``*args`` and ``**kwargs`` (they go through apply, so vmap sees
    them), the rest static."""
    if marked_args and max(marked_args) >= len(args):
        raise ValueError(
            f"implicit: diff_args={sorted(marked_args)} names an argument the solver was not "
            f"given: it was called with {len(args)} extra positional argument(s) after "
            "(params0, hparams); keyword arguments cannot be in diff_args."
        )
    tensors: Leaves = []
    static: list[Any] = []
    marked: list[bool] = []
    names: list[str] = []
    specs: list[tuple[int | str, Any]] = []
    entries: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
    for key, arg in entries:
        name = f"kwargs[{key!r}]" if isinstance(key, str) else f"args[{key}]"
        is_marked = not isinstance(key, str) and key in marked_args
        leaves, spec = T.tree_flatten(arg)
        specs.append((key, spec))
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                if is_marked:
                    raise TypeError(
                        f"implicit: {name} is in diff_args, so it should be a tensor or a "
                        f"pytree of tensors; it holds a {type(leaf).__name__}."
                    )
                static.append(leaf)
                continue
            if is_marked and not leaf.is_floating_point():
                raise TypeError(f"implicit: {name} is in diff_args but holds a {leaf.dtype} tensor.")
            if not is_marked and leaf.requires_grad and torch.is_grad_enabled():
                refuse_lost_gradient(f"implicit: {name}", f"requires grad but {_why(name)}", "gradient", _fix(name))
            tensors.append(leaf)
            static.append(None)
            marked.append(is_marked)
            names.append(name)
    return tensors, tuple(static), tuple(marked), tuple(names), tuple(specs)

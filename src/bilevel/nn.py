"""``nn.Module`` workflows, and deep equilibrium layers.

**Modules as functions of params and hparams.**  A bilevel problem needs the network as a
pure function of the tensors it differentiates: :func:`tensors` takes a module's parameters
(and buffers) as a dict ``{name: tensor}`` — detached views that share the module's storage,
so an optimiser step on the module shows in the next call — :func:`split` divides such a
dict by name prefix into ``params`` (inner variables) and ``hparams`` (outer variables),
and :func:`call` evaluates the module at given tensors (``torch.func.functional_call``)::

    hparams, params = bilevel.nn.split(bilevel.nn.tensors(net), "body.")   # body: outer, head: inner
    inner_loss = lambda w, lam: F.cross_entropy(bilevel.nn.call(net, (w, lam), x_tr), y_tr)

**Buffers and BatchNorm.**  :func:`call` is a pure function: it never writes a buffer.
Buffers not passed in ``tensors`` are the module's own, read as constants of the inner
problem.  A normalisation layer (``BatchNorm*``, ``InstanceNorm*`` with running
statistics) in train mode normalises with the batch statistics of the input — a
differentiable function of params, hparams and data, the same at every evaluation — and
does not update its running statistics; in eval mode it uses the running statistics (the
module's, or those passed in ``tensors``), constants.  Running statistics change only
where the caller asks, with :func:`update_stats`: one forward pass outside any
differentiation, in train mode, under ``torch.no_grad()``.  So a solver that evaluates
the losses many times (CG, GMRES, unrolled steps, vmapped tasks) sees one fixed function,
and the statistics do not depend on how many iterations a solver happened to take.

**Outer step with ``torch.optim``.**  :func:`set_grad` writes a hypergradient (a dict
shaped like the hparams from :func:`tensors`) into ``.grad`` of the module's parameters;
then ``optimizer.step()`` as usual.

**Deep equilibrium layers.**

:class:`DEQ` wraps a cell ``f(z, x)`` (an ``nn.Module``) and returns ``z* = f(z*, x)``
(Bai, Kolter, Koltun, NeurIPS 2019).  The forward pass finds ``z*`` with a forward
solver value (:class:`~bilevel.fixed_point_solve.Anderson` or
:class:`~bilevel.fixed_point_solve.Picard`) without building a graph; the backward pass is
the implicit function theorem in fixed-point form, ``(I − ∂_z f)ᵀ v = ∂L/∂z*`` solved with
a linear-solver value, then ``∂L/∂θ = (∂_θ f)ᵀ v`` and ``∂L/∂x = (∂_x f)ᵀ v`` — the same
code path as :func:`bilevel.implicit` and :func:`bilevel.hypergrad`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from bilevel.custom import ImplicitInfo, implicit
from bilevel.fixed_point_solve import Anderson, FixedPointSolver, solve_fixed_point
from bilevel.linear_solve import GMRES, SolveInfo, Solver, check_solver

__all__ = ["DEQ", "tensors", "split", "call", "update_stats", "set_grad"]

_FORWARD_FIX = ("The implicit gradient assumes a fixed point. Raise maxiter, use Anderson(), or make "
                "the cell more contractive (e.g. normalise its weights).")
_FORWARD_DIVERGED = ("The cell is not a contraction in z: make it one (e.g. spectral normalisation of the "
                     "weights acting on z, ‖∂cell/∂z‖ < 1), or use Anderson(), which can reach a repelling "
                     "fixed point.")


Named = dict[str, torch.Tensor]

# the normalisation layers of torch.nn that keep running statistics (BatchNorm*, InstanceNorm*)
_NORM = nn.modules.batchnorm._NormBase


def tensors(module: nn.Module, prefix: str | Sequence[str] | None = None, *, buffers: bool = False) -> Named:
    """``{name: tensor}`` of ``module``'s parameters (and buffers with ``buffers=True``),
    those whose name starts with ``prefix`` (a string or several) or all.

    The tensors are detached views: they share the module's storage (no copy), so after
    ``optimizer.step()`` on the module the same dict holds the new values.  Use them as
    ``params`` / ``hparams`` of :func:`bilevel.hypergrad`, :func:`bilevel.unroll` or
    :func:`bilevel.implicit`, and evaluate the module at them with :func:`call`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"tensors: module should be an nn.Module, not {type(module).__name__}.")
    named = dict(module.named_parameters())
    if buffers:
        named.update(module.named_buffers())
    out = {k: t.detach() for k, t in named.items() if _under(k, prefix)}
    if prefix is not None and not out:
        raise ValueError(f"tensors: no {'parameter or buffer' if buffers else 'parameter'} of "
                         f"{type(module).__name__} is named {_prefixes(prefix)}...; its names are "
                         f"{_names(named)}.")
    return out


def split(named: Mapping[str, torch.Tensor], prefix: str | Sequence[str]) -> tuple[Named, Named]:
    """``(those whose name starts with prefix, the rest)`` of a ``{name: tensor}`` dict.

    E.g. ``hparams, params = split(tensors(net), "body.")``: the body of the network is
    the outer variable, everything else (the head) the inner one.  Both parts must be
    non-empty."""
    inside = {k: t for k, t in named.items() if _under(k, prefix)}
    rest = {k: t for k, t in named.items() if k not in inside}
    if not inside or not rest:
        raise ValueError(f"split: prefix {_prefixes(prefix)} selects {'no' if not inside else 'every'} name of "
                         f"{_names(named)}; pick a prefix that divides them.")
    return inside, rest


def call(module: nn.Module, tensors: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
         *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with its parameters (and any buffers) replaced by
    ``tensors`` — a dict or several (e.g. ``(params, hparams)``) — as a pure function.

    Every parameter of ``module`` must be in ``tensors`` (a missing one would be a silent
    constant: ``ValueError``; pass constants explicitly, e.g. ``tensors(module, "head.")``);
    a name the module does not have is a ``ValueError``.  Buffers not given are the
    module's own, read only.  Normalisation layers with running statistics, in train
    mode, normalise with the input's batch statistics and leave the running statistics
    unchanged; in eval mode they use the running statistics (see the module docstring).
    Works under ``torch.func`` transforms (``grad``, ``vmap``, ``jvp``).  A module that
    writes its own buffers in ``forward`` (other than torch.nn's normalisation layers) is a
    ``RuntimeError`` after the call: use :func:`update_stats` for such updates.  Not
    thread-safe on one module: ``functional_call`` swaps the module's tensors for the
    duration of the call.
    """
    merged, own_buffers = _inputs(module, tensors, "call")
    aside = _running_statistics(module)
    kept = {k: t for k, t in own_buffers.items() if k not in merged and k not in aside}
    versions = {k: t._version for k, t in kept.items()}
    out = _functional_call(module, {**merged, **dict.fromkeys(aside)}, args, kwargs)
    changed = [k for k, t in kept.items() if t._version != versions[k]]
    if changed:
        raise RuntimeError(f"call: {type(module).__name__}.forward wrote its buffer(s) {_names(changed)}, so the "
                           "function differs from one evaluation to the next; update buffers only with "
                           "bilevel.nn.update_stats(), outside differentiation.")
    return out


def update_stats(module: nn.Module, tensors: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
                 *args: Any, **kwargs: Any) -> Any:
    """Update the running statistics of ``module``'s normalisation layers with one forward
    pass at ``tensors`` (all its parameters, checked as by :func:`call`), in train mode, under
    ``torch.no_grad()``: ``running ← (1 − momentum)·running + momentum·batch`` (the batch
    mean, and the unbiased batch variance; with ``momentum=None`` the cumulative average),
    exactly as one ordinary training forward pass on ``args`` would move them.
    Every submodule runs in train mode, an eval-mode (frozen) normalisation layer included;
    the module's buffers are written in place; its train/eval modes are restored.  Returns
    the output of that pass (detached).  Call it outside any differentiation or
    ``torch.func`` transform, e.g. once per outer step on the meta-batch's data.
    """
    merged, own_buffers = _inputs(module, tensors, "update_stats")
    passed = [k for k in merged if k in own_buffers]
    if passed:
        raise ValueError(f"update_stats: {_names(passed)} are buffers; it updates the module's own buffers, so "
                         "pass only parameters.")
    modes = {m: m.training for m in module.modules()}
    try:
        module.train()
        with torch.no_grad():
            return _functional_call(module, {k: t.detach() for k, t in merged.items()}, args, kwargs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def set_grad(module: nn.Module, grads: Mapping[str, torch.Tensor], *, accumulate: bool = False) -> None:
    """Write ``grads`` (``{name: tensor}``, e.g. the hypergradient returned for the hparams
    of :func:`tensors`) into ``.grad`` of ``module``'s parameters of those names, for an
    outer step with any ``torch.optim`` optimiser::

        hg = bilevel.hypergrad(outer_loss, params, hparams, inner_loss=inner_loss)
        opt.zero_grad(); bilevel.nn.set_grad(net, hg); opt.step()

    Each ``.grad`` is a copy (an optimiser that zeroes or scales ``.grad`` in place does not
    touch ``grads``); with ``accumulate=True`` it is added to an existing ``.grad``.
    Parameters not named in ``grads`` keep their ``.grad``.
    """
    own = dict(module.named_parameters())
    unknown = [k for k in grads if k not in own]
    if unknown:
        raise ValueError(f"set_grad: {type(module).__name__} has no parameter named {_names(unknown)}; "
                         f"its parameters are {_names(own)}.")
    for k, g in grads.items():
        p = own[k]
        if not isinstance(g, torch.Tensor) or g.shape != p.shape:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"set_grad: the gradient for {k!r} should have the shape {tuple(p.shape)} of the "
                             f"parameter, not {shape}.")
        if accumulate and p.grad is not None:
            p.grad = p.grad + g.detach().to(dtype=p.dtype, device=p.device)
        else:
            p.grad = g.detach().to(dtype=p.dtype, device=p.device, copy=True)


def _functional_call(module: nn.Module, named: Mapping[str, torch.Tensor | None], args: Any, kwargs: Any) -> Any:
    """``functional_call`` with each tensor in every slot (owning module, attribute) that
    holds it: a weight tied between two layers takes the given value in both.  Not
    ``tie_weights=True``: on a submodule reached by two paths (one layer applied twice) it
    swaps the one slot twice and leaves the given tensor in the module afterwards
    (pytorch/pytorch#164759)."""
    slots: dict[str, list[str]] = {}  # name in named_parameters()/named_buffers() -> one name per slot
    first: dict[int, str] = {}        # id of a tensor -> that name
    for prefix, m in module.named_modules():  # each submodule once, by its first path: each slot once
        for attr, t in [*m.named_parameters(recurse=False, remove_duplicate=False),
                        *m.named_buffers(recurse=False, remove_duplicate=False)]:
            name = f"{prefix}.{attr}" if prefix else attr
            slots.setdefault(first.setdefault(id(t), name), []).append(name)
    full = {s: t for k, t in named.items() for s in slots.get(k, [k])}
    return functional_call(module, full, args, kwargs, tie_weights=False, strict=False)


def _inputs(module: nn.Module, tensors: Any, where: str) -> tuple[Named, Named]:
    """``tensors`` merged into one dict, checked against ``module``'s names (every parameter
    given, no unknown name), and the module's own buffers."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: module should be an nn.Module, not {type(module).__name__}.")
    merged = _merge(tensors, where)
    own_params = dict(module.named_parameters())
    own_buffers = dict(module.named_buffers())
    unknown = [k for k in merged if k not in own_params and k not in own_buffers]
    if unknown:
        raise ValueError(f"{where}: {type(module).__name__} has no parameter or buffer named {_names(unknown)}; "
                         f"its parameters are {_names(own_params)}.")
    missing = [k for k in own_params if k not in merged]
    if missing:
        raise ValueError(f"{where}: no tensor given for the parameter(s) {_names(missing)} of "
                         f"{type(module).__name__}; pass them too (constants included), e.g. "
                         "tensors(module) split into params and hparams.")
    return merged, own_buffers


def _running_statistics(module: nn.Module) -> list[str]:
    """Names of the running statistics of ``module``'s normalisation layers in train mode.

    :func:`call` passes ``None`` for them: with no running statistics, ``BatchNorm*`` and
    ``InstanceNorm*`` normalise with the input's statistics and write nothing (nothing
    in-place meets a vmapped or differentiated input).  Switching ``track_running_stats``
    off would not do for ``InstanceNorm*``, which hands its running statistics to
    ``instance_norm`` (an in-place update) in train mode whatever that flag says."""
    return [f"{name}.{b}" if name else b
            for name, m in module.named_modules() if isinstance(m, _NORM) and m.training and m.track_running_stats
            for b in ("running_mean", "running_var", "num_batches_tracked") if getattr(m, b, None) is not None]


def _merge(tensors: Any, where: str) -> Named:
    groups = [tensors] if isinstance(tensors, Mapping) else list(tensors) if isinstance(tensors, (list, tuple)) \
        else None
    if groups is None or not all(isinstance(g, Mapping) for g in groups):
        raise TypeError(f"{where}: tensors should be a dict {{name: tensor}} or a tuple of such dicts (e.g. "
                        f"(params, hparams)), not {type(tensors).__name__}.")
    merged: Named = {}
    for g in groups:
        for k, t in g.items():
            if k in merged:
                raise ValueError(f"{where}: {k!r} is given twice; each name belongs in one dict.")
            merged[k] = t
    return merged


def _under(name: str, prefix: str | Sequence[str] | None) -> bool:
    if prefix is None:
        return True
    return name.startswith(prefix) if isinstance(prefix, str) else any(name.startswith(p) for p in prefix)


def _prefixes(prefix: str | Sequence[str]) -> str:
    return repr(prefix) if isinstance(prefix, str) else " or ".join(map(repr, prefix))


def _names(names: Any) -> str:
    names = list(names)
    shown = ", ".join(map(repr, names[:8]))
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "(none)"


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
            return _functional_call(cell, hparams[0], (z, hparams[1]), {})

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

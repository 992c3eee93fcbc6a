"""Approximate implicit differentiation (AID): the implicit function theorem, written once.

Fixed-point form, ``w(λ) = Φ(w(λ), λ)`` with ``Φ`` a contraction in ``w``::

    ∇F(λ) = ∇_λ f + (∂_λΦ)ᵀ v,      (I − ∂_wΦ)ᵀ v = ∇_w f

Optimality form, ``∇_w g(w(λ), λ) = 0`` with ``H = ∇²_w g`` invertible::

    ∇F(λ) = ∇_λ f − (∂²_{λw} g)ᵀ v,  H v = ∇_w f

Both are "one vjp closure at the solution, a linear solve, one more vjp for the λ-part"
(Grazzi, Franceschi, Pontil, Salzo, ICML 2020).  :func:`implicit_operator` builds the
pieces; :func:`hypergrad` puts them together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch.func import grad, jvp, vjp

from bilevel import _tree as T
from bilevel._checks import (
    all_finite,
    check_autograd,
    check_converged,
    check_finite,
    check_inner_solution,
    check_input_finite,
    check_positive,
    check_reached,
    check_shaped_like,
    check_tol,
    checked_output,
    differentiable,
    eager,
    explain_inference,
    info_pytree,
    inner_scale,
    item,
    leaves_pair,
    no_transform,
    scalar,
    unused_hparams,
    warn_error_above,
    worst,
)
from bilevel.error import AIDError, ErrorEstimate, ritz_values
from bilevel.linear_solve import (
    CG,
    GMRES,
    SYMMETRIC_SOLVERS,
    Dense,
    FixedPoint,
    Neumann,
    NormalCG,
    Solver,
    check_solver,
    solve_leaves,
)

__all__ = ["hypergrad", "HypergradInfo", "ImplicitOperator", "implicit_operator", "check_symmetric"]

Leaves = list[torch.Tensor]


@partial(info_pytree, static=("solver", "iterations", "inner_iterations", "damping"))  # returnable under vmap
@dataclass(frozen=True)
class HypergradInfo:
    """What :func:`hypergrad` did.

    ``iterations``, ``residual`` (relative, ``‖b − A v‖/‖b‖``) and ``converged``: of the
    linear solve.  ``inner_residual``: ``‖∇_w g(w, λ)‖`` (optimality form) or
    ``‖Φ(w, λ) − w‖`` (fixed-point form) at the ``params`` given, i.e. how far they are
    from the inner solution.  ``v``: the solution of the linear system, shaped like
    ``params``; pass it as ``init=`` to warm-start the next call.

    ``error_estimate``: an estimate of an upper bound on ``‖ĝ − ∇F(λ)‖`` (Euclidean over all
    hparams leaves) from the inner residual and the linear-system residual, and ``error``:
    its parts (:class:`bilevel.error.ErrorEstimate`); ``None`` unless ``estimate=True`` or
    ``tol=``.  An estimate, not a guarantee: see :mod:`bilevel.error`.  ``contraction``: the
    estimated ``q̂`` (``‖∂_wΦ‖``, or ``1 − μ̂/L̂`` for an inner_loss); from the estimate when
    there is one, else where the solve gives it for free (no extra product, outside torch.func
    transforms): CG on an inner_loss (its Lanczos coefficients), GMRES on a fixed_point (its
    first Hessenberg matrix), FixedPoint/Neumann with step 1 on a fixed_point from ``v = 0``
    (the mean residual decay); else ``None``.
    ``inner_iterations``: inner steps run (by :func:`bilevel.hypergrad_within`; else 0).
    ``damping``: the ``δ`` of the damped system ``(A + δI) v = b`` that was solved.
    """

    solver: str
    iterations: int
    residual: float | torch.Tensor
    converged: bool | torch.Tensor
    inner_residual: float | torch.Tensor
    outer_loss: float | torch.Tensor
    v: Any
    error_estimate: float | torch.Tensor | None = None
    contraction: float | torch.Tensor | None = None
    error: ErrorEstimate | None = None
    inner_iterations: int = 0
    damping: float = 0.0


@dataclass(frozen=True)
class ImplicitOperator:
    """The linear system of the IFT at ``(w, λ)``, as closures built once.

    ``matvec(v) = A v`` and ``rmatvec(u) = Aᵀ u`` on leaves of ``params``, where
    ``A = H`` (optimality form), ``A = (I − ∂_wΦ)ᵀ`` (fixed-point form) or
    ``A = (∂_w F)ᵀ`` (root form, ``F(w, λ) = 0``);
    ``cross(v)``: the λ-part, ``−(∂²_{λw} g)ᵀ v``, ``(∂_λΦ)ᵀ v`` or ``−(∂_λ F)ᵀ v``, on
    leaves of ``hparams``.  ``inner_residual``: ``‖∇_w g‖``, ``‖Φ(w, λ) − w‖`` or ``‖F‖``,
    and ``inner_vector`` the vector itself (``∇_w g``, ``Φ(w, λ) − w`` or ``F``, detached).
    """

    matvec: Callable[[Leaves], Leaves]
    rmatvec: Callable[[Leaves], Leaves]
    cross: Callable[[Leaves], Leaves]
    symmetric: bool
    inner_residual: torch.Tensor
    inner_vector: Leaves | None = None


def _tree_fn(fn: Callable[..., Any], wspec: Any, lspec: Any) -> Callable[[Leaves, Leaves], Any]:
    """fn(params, hparams) as a function of leaves."""
    return lambda w, lam: fn(T.tree_unflatten(list(w), wspec), T.tree_unflatten(list(lam), lspec))


def implicit_operator(
    params: Leaves,
    hparams: Leaves,
    wspec: Any,
    lspec: Any,
    *,
    inner_loss: Callable[[Any, Any], torch.Tensor] | None = None,
    fixed_point: Callable[[Any, Any], Any] | None = None,
    root: Callable[[Any, Any], Any] | None = None,
) -> ImplicitOperator:
    """Build the IFT linear operator at ``(params, hparams)`` (leaves), closures made once.

    Pass exactly one of ``inner_loss``, ``fixed_point`` or ``root`` (``F(w, λ) = 0``, ``F``
    shaped like ``params``: a KKT map, any optimality condition).
    """
    check_autograd("implicit_operator")
    w, lam = params, hparams
    if sum(fn is not None for fn in (inner_loss, fixed_point, root)) != 1:
        raise ValueError(
            "pass exactly one of inner_loss= (optimality form, ∇_w g = 0) or "
            "fixed_point= (w = Φ(w, λ))"
            + (" or root= (F(w, λ) = 0)." if root is not None else ".")
        )
    if inner_loss is not None:
        g = _tree_fn(inner_loss, wspec, lspec)

        def scalar_g(wl: Leaves, ll: Leaves) -> torch.Tensor:
            return scalar(g(wl, ll), "inner_loss")

        if _plain_autograd(w, lam):
            # one graph of ∇_w g, kept: each Hessian–vector product is one backward through
            # it, and the λ-part reuses it (no second gradient evaluation)
            with torch.enable_grad():
                wr, lr = _fresh_leaves(w), _fresh_leaves(lam)
                gw = _grads(scalar_g(wr, lr), wr, create_graph=True)
            hvp_ag = lambda v: _grads(gw, wr, v)  # noqa: E731
            gw_d = [t.detach() for t in gw]
            return ImplicitOperator(hvp_ag, hvp_ag, lambda v: [-t for t in _grads(gw, lr, v)], True, T.norm(gw_d), gw_d)

        # one trace of ∇_w g: the Hessian–vector products pull back to w, the λ-part to λ
        gw, hvp, mixed = _traced_vjp(grad(scalar_g), w, lam)
        return ImplicitOperator(hvp, hvp, lambda v: [-t for t in mixed(v)], True, T.norm(gw), [t.detach() for t in gw])

    name = "fixed_point" if root is None else "root"
    phi = _tree_fn(fixed_point if root is None else root, wspec, lspec)  # type: ignore[arg-type]

    def phi_leaves(wl: Leaves, ll: Leaves) -> Leaves:
        out, ospec = T.tree_flatten(phi(wl, ll))
        check_shaped_like(out, ospec, w, wspec, f"{name}(params, hparams)")
        return out

    if _plain_autograd(w, lam):  # one graph of Φ (or F), kept; every vjp is one backward through it
        with torch.enable_grad():
            wr, lr = _fresh_leaves(w), _fresh_leaves(lam)
            phi_graph = phi_leaves(wr, lr)
        out = [t.detach() for t in phi_graph]
        jt1 = lambda v: _grads(phi_graph, wr, v)  # noqa: E731
        dl_of = lambda v: _grads(phi_graph, lr, v)  # noqa: E731
    else:  # one trace of Φ (or F) under torch.func: vjps to w and to λ from it
        out, jt1, dl_of = _traced_vjp(phi_leaves, w, lam)
    if root is not None:  # A = (∂_w F)ᵀ directly: no I − (I − ·) round trip, no cancellation

        def root_rmatvec(u: Leaves) -> Leaves:  # (∂_w F) u, forward mode
            return list(jvp(lambda wl: phi_leaves(wl, lam), (w,), (u,))[1])

        def root_cross(v: Leaves) -> Leaves:  # −(∂_λ F)ᵀ v
            return [-t for t in dl_of(v)]

        return ImplicitOperator(jt1, root_rmatvec, root_cross, False, T.norm(out), [t.detach() for t in out])

    def matvec(v: Leaves) -> Leaves:  # (I − ∂_wΦ)ᵀ v
        return T.sub(v, jt1(v))

    def rmatvec(u: Leaves) -> Leaves:  # (I − ∂_wΦ) u, forward mode
        return T.sub(u, jvp(lambda wl: phi_leaves(wl, lam), (w,), (u,))[1])

    step = [t.detach() for t in T.sub(out, w)]
    return ImplicitOperator(matvec, rmatvec, dl_of, False, T.norm(step), step)


def _plain_autograd(*groups: Leaves) -> bool:
    """True when no torch.func transform (vmap, grad, jvp) is active and every leaf is a
    floating tensor: then the operator is built on ordinary autograd with a retained graph,
    which is faster per product than a torch.func vjp closure (~25% on a logistic HVP).
    Under a transform, or when the result must itself be differentiable, torch.func is used."""
    if not no_transform():
        return False
    leaves = [t for group in groups for t in group]
    if torch.is_grad_enabled() and any(t.requires_grad for t in leaves):
        return False  # a differentiable backward (higher order): keep the graph to the inputs
    return all(t.is_floating_point() or t.is_complex() for t in leaves)


def _fresh_leaves(leaves: Leaves) -> Leaves:
    return [t.detach().requires_grad_() for t in leaves]


def _grads(outputs: Leaves, inputs: Leaves, cotangents: Leaves | None = None, create_graph: bool = False) -> Leaves:
    """Σ_i ⟨cotangent_i, ∂ output_i / ∂ inputs⟩ through a retained graph; zeros where an
    input does not reach the outputs (the derivative is then exactly zero, not missing)."""
    if isinstance(outputs, torch.Tensor):
        outputs, cotangents = [outputs], [torch.ones_like(outputs)]
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    got = torch.autograd.grad(
        [o for o, _ in pairs], inputs, [c for _, c in pairs],
        retain_graph=True, create_graph=create_graph, allow_unused=True,
    )
    return [torch.zeros_like(x) if gi is None else gi for gi, x in zip(got, inputs)]


def _traced_vjp(
    fn: Callable[[Leaves, Leaves], Leaves], w: Leaves, lam: Leaves
) -> tuple[Leaves, Callable[[Leaves], Leaves], Callable[[Leaves], Leaves]]:
    """``fn(w, λ)`` (leaves to leaves) traced once by ``torch.func.vjp``, with two pullbacks
    from that one trace: ``u ↦ (∂_w fn)ᵀ u`` and ``u ↦ (∂_λ fn)ᵀ u``.

    The closure that ``vjp`` returns always pulls back to every primal: as a product with
    ``∂_w`` alone it would also pay the whole path to ``λ`` (back through a feature network,
    say) at every solver iteration, and a second ``vjp`` for the λ-part traces ``fn`` again.
    So the trace's own differentiable primals and outputs are kept, and each pullback asks
    autograd for just the inputs it needs — the call ``vjp``'s closure makes itself, after
    its transform level has exited (``create_graph`` when grad mode is on: differentiable
    under an outer ``torch.func.grad`` / ``create_graph=True``, as that closure is)."""
    trace: list[tuple[Leaves, Leaves, Leaves]] = []

    def traced(wl: Leaves, ll: Leaves) -> Leaves:
        out = fn(wl, ll)
        trace.append((list(wl), list(ll), list(out)))
        return out

    value, pullback = vjp(traced, w, lam)
    if len(trace) != 1:  # pragma: no cover - a torch.func that traces differently: its closure, twice
        return list(value), lambda u: list(pullback(u)[0]), lambda u: list(pullback(u)[1])
    wl, ll, outs = trace[0]

    def pull(inputs: Leaves, u: Leaves) -> Leaves:
        return _grads(outs, inputs, list(u), create_graph=torch.is_grad_enabled())

    return list(value), partial(pull, wl), partial(pull, ll)


def _probe(like: Leaves, phase: float) -> Leaves:
    """A fixed, generic (not random: no generator, so it also works under vmap) vector."""
    out, offset = [], 0
    for t in like:
        i = torch.arange(offset, offset + t.numel(), dtype=t.dtype, device=t.device)
        out.append(torch.sin(1.6180339887 * i + phase).reshape(t.shape))
        offset += t.numel()
    return out


def _asymmetry(matvec: Callable[[Leaves], Leaves], like: Leaves) -> float:
    """Relative size of <u, A z> − <z, A u> for two fixed probes (2 matvecs), worst vmap row."""
    u, z = _probe(like, 0.3), _probe(like, 1.1)
    au, az = matvec(u), matvec(z)
    scale = T.norm(u) * T.norm(az) + T.norm(z) * T.norm(au)
    return worst((T.vdot(u, az) - T.vdot(z, au)).abs() / torch.clamp(scale, min=1e-300))


def check_symmetric(solver: Solver, op: ImplicitOperator, like: Leaves, form: str = "fixed_point") -> None:
    """Refuse CG/MINRES on a non-symmetric system (probed with 2 matvecs, every vmap row)."""
    if not isinstance(solver, SYMMETRIC_SOLVERS) or op.symmetric:
        return
    asym = _asymmetry(op.matvec, like)
    if not asym <= torch.finfo(like[0].dtype).eps ** 0.4:
        system = "(∂_w F)ᵀ of this root" if form == "root" else "(I − ∂_wΦ)ᵀ of this fixed_point"
        raise ValueError(
            f"{type(solver).__name__} needs a symmetric system, but {system} is not "
            f"symmetric (relative asymmetry {asym:.2g}). Use GMRES(), NormalCG() or "
            "FixedPoint(), or pass inner_loss= if it is the gradient of a loss."
        )




@eager  # under torch.compile: runs eagerly (a graph break), never mis-traced
def hypergrad(
    outer_loss: Callable[[Any, Any], torch.Tensor],
    params: Any,
    hparams: Any,
    *,
    inner_loss: Callable[[Any, Any], torch.Tensor] | None = None,
    fixed_point: Callable[[Any, Any], Any] | None = None,
    solver: Solver = CG(),
    init: Any = None,
    precond: Callable[[Any], Any] | None = None,
    inner_tol: float | None = None,
    create_graph: bool = False,
    return_info: bool = False,
    tol: float | None = None,
    estimate: bool = False,
    damping: float = 0.0,
) -> Any:
    """Hypergradient ``∇F(λ)`` of ``F(λ) = f(w(λ), λ)`` by implicit differentiation (AID).

    ``params`` should be (close to) the inner solution ``w(λ)``: a minimiser of
    ``inner_loss(params, hparams)`` (then ``H v = ∇_w f``, ``∇F = ∇_λ f − (∂²_{λw} g)ᵀ v``)
    or a fixed point of ``fixed_point(params, hparams)`` (then ``(I − ∂_wΦ)ᵀ v = ∇_w f``,
    ``∇F = ∇_λ f + (∂_λΦ)ᵀ v``).  Pass exactly one of them.  ``params`` and ``hparams``
    are tensors or pytrees of tensors; ``outer_loss(params, hparams)`` returns a scalar.

    ``solver`` is a value from :mod:`bilevel.linear_solve`.  ``CG``/``MINRES`` need a
    symmetric system: always so for ``inner_loss``; for a ``fixed_point`` the symmetry is
    checked with two probes and a non-symmetric map is refused.  ``init`` warm
    starts the linear solve (e.g. ``info.v`` of the previous call).  ``precond(v) ≈ A⁻¹ v``
    (SPD, on pytrees shaped like ``params``) preconditions CG, e.g. the ``inverse_hessian``
    that :func:`bilevel.lbfgs` returns for the same inner problem.

    Returns a pytree shaped like ``hparams``, or ``(hypergrad, HypergradInfo)`` with
    ``return_info=True`` (also under ``vmap``: the info's numbers are then per-task
    tensors).  The result is detached, unless the caller differentiates it — under
    ``torch.func.grad``/``jacrev``/``jvp``, or with ``create_graph=True`` (plain autograd,
    as in ``torch.autograd.grad``) — then it is differentiable w.r.t. ``params`` and
    ``hparams``, and its derivative is the second-order hypergradient (through the linear
    solve: as accurate as the solve's tolerance).

    Accuracy: with ``estimate=True`` (and ``return_info=True``) the info carries
    ``error_estimate``, an a-posteriori estimate of ``‖ĝ − ∇F(λ)‖`` (the inner error from the
    inner residual, the linear-system error from its true residual; :mod:`bilevel.error`).
    It costs 13–31 extra products (as much as a short solve), so it is off by default.
    ``tol=ε`` chooses the linear solve's length instead of
    ``solver.tol``: iterations (up to ``solver.maxiter``) are added until the estimated
    error is ``≤ ε``; if the inner error alone exceeds ``ε`` it warns that ``ε`` cannot be
    met with these ``params`` (solve the inner problem further, or use
    :func:`bilevel.hypergrad_within`, which chooses the inner iterations too).

    ``damping=δ > 0`` solves ``(A + δI) v = ∇_w f`` instead (A = H, or ``(I − ∂_wΦ)ᵀ``):
    the Levenberg–Marquardt / iMAML / TorchOpt ``ridge`` regularisation for an inner problem
    that is not solved (a network after a few hundred optimiser steps), where H is
    indefinite or nearly singular and CG would stop at negative curvature.  It is a
    deliberate bias: the result is the hypergradient of the inner problem with an extra
    proximal term ``δ/2 ‖w − w_t‖²`` at the current ``w_t`` — exact as ``δ → 0`` where H is
    positive definite, and shrinking ``v`` (so the implicit part of ``∇F``) along directions
    of curvature below ``δ``.  Choose ``δ`` around the size of the smallest curvature you
    trust (e.g. the L2 weight); ``info.damping`` and the error estimate refer to the damped
    system.

    Trust: warns (:class:`~bilevel.ConvergenceWarning`) when the linear solve missed its
    tolerance, and when ``params`` are not an inner solution: ``‖∇_w g‖`` (or
    ``‖Φ(w) − w‖``) above ``inner_tol`` if given, else a relative inner residual
    (``‖∇_w g‖/‖H w‖``, or ``‖Φ(w) − w‖/‖w‖``) above 0.05.  Raises for a non-scalar loss,
    mismatched structures, NaN/Inf, a diverging fixed-point iteration, a singular system,
    and an ``hparams`` leaf that reaches neither loss.
    """
    check_solver(solver)
    check_autograd("hypergrad")
    if tol is not None:
        check_positive("hypergrad: tol", tol)
    if damping != 0:
        check_positive("hypergrad: damping", damping)
    if not isinstance(estimate, bool):
        raise TypeError(f"hypergrad: estimate should be True or False, not {estimate!r}.")
    if inner_tol is not None and inner_tol != math.inf:  # inf: no inner-residual warning at all
        check_tol("hypergrad: inner_tol", inner_tol)
    (w, wspec), (lam, lspec) = leaves_pair(params, hparams, "params")
    keep_graph = differentiable(create_graph)
    if not keep_graph:
        w = [t.detach() for t in w]
        lam = [t.detach() for t in lam]
    if not all_finite(w + lam):  # one read for both; the message names which
        check_input_finite(w, "params")
        check_input_finite(lam, "hparams")
    try:
        hg, v, sinfo, op, fval, err, q = _hypergrad(outer_loss, w, lam, wspec, lspec, inner_loss, fixed_point,
                                                    solver, init, precond, tol,
                                                    (estimate and return_info) or tol is not None, float(damping),
                                                    return_info and no_transform())
    except RuntimeError as exc:
        raise explain_inference(exc, "hypergrad") from exc
    if tol is None:
        check_converged("hypergrad", sinfo, getattr(solver, "tol", 0.0),
                        "Raise the solver's maxiter, use CG() (inner_loss) "
                        "or GMRES() (fixed_point), or pass init=info.v of the previous call.")
    check_inner_solution("hypergrad", "inner_loss" if inner_loss is not None else "fixed_point", op.inner_residual,
                         lambda: inner_scale(w, op.matvec if inner_loss is not None else None), inner_tol)
    out = T.tree_unflatten(hg if keep_graph else [t.detach() for t in hg], lspec)
    if not return_info:
        return out
    info = HypergradInfo(
        sinfo.solver,
        sinfo.iterations,
        sinfo.residual,
        sinfo.converged,
        item(op.inner_residual.detach()),
        item(fval.detach()),
        T.tree_unflatten([t.detach() for t in v], wspec),
        None if err is None else err.total,
        q if err is None else err.contraction,
        err,
        damping=float(damping),
    )
    return out, info


def _outer_grads(f: Callable[[Leaves, Leaves], Any], w: Leaves, lam: Leaves) -> tuple[Any, Leaves, Leaves]:
    """``(f, ∇_w f, ∇_λ f)`` at ``(w, λ)``."""
    if _plain_autograd(w, lam):
        with torch.enable_grad():
            wr, lr = _fresh_leaves(w), _fresh_leaves(lam)
            fval = scalar(f(wr, lr), "outer_loss")
            both = _grads(fval, wr + lr)
        return fval.detach(), both[: len(w)], both[len(w) :]
    fval, f_vjp = vjp(lambda wl, ll: scalar(f(wl, ll), "outer_loss"), w, lam)
    gw, gl = f_vjp(torch.ones_like(fval))
    return fval, list(gw), list(gl)


def _damped(op: ImplicitOperator, damping: float) -> ImplicitOperator:
    """The operator of ``(A + δI) v = b`` (and ``(A + δI)ᵀ = Aᵀ + δI``)."""
    if damping == 0:
        return op
    return replace(op, matvec=lambda v: T.axpy(damping, v, op.matvec(v)),
                   rmatvec=lambda u: T.axpy(damping, u, op.rmatvec(u)))


def _hypergrad(outer_loss, w, lam, wspec, lspec, inner_loss, fixed_point, solver, init, precond, tol, estimate,
               damping=0.0, free_contraction=False):
    f = _tree_fn(outer_loss, wspec, lspec)
    fval, gw, gl = _outer_grads(f, w, lam)
    check_finite(gw, "∇_w outer_loss")

    op = _damped(implicit_operator(w, lam, wspec, lspec, inner_loss=inner_loss, fixed_point=fixed_point), damping)
    check_symmetric(solver, op, w)
    x0 = None
    if init is not None:
        x0, ispec = T.tree_flatten(init)
        if ispec != wspec or any(not isinstance(a, torch.Tensor) or a.shape != b.shape for a, b in zip(x0, w)):
            raise ValueError(f"init should be shaped like params ({T.describe(T.tree_unflatten(w, wspec))}), "
                             f"got {T.describe(init)}.")
    pc = None if precond is None else checked_output(T.flat_fn(precond, wspec), w, "precond")

    arnoldi: list = []  # GMRES's first Hessenberg columns, for the free contraction

    def solve_once(slv: Solver, start: Leaves | None) -> tuple[Leaves, Any, Leaves, list]:
        lanczos: list = []
        # CG's Lanczos coefficients cost ~10 scalar ops per iteration (under vmap, as many dispatches): only
        # for the estimate.  v is checked finite in the solve
        wanted = estimate or (free_contraction and isinstance(slv, CG))
        v, sinfo = _solve(op, gw, slv, start, pc, lanczos if pc is None and wanted else None,
                          arnoldi if free_contraction and not estimate and isinstance(slv, GMRES) else None)
        return v, sinfo, op.cross(v), lanczos

    err = None
    if estimate:
        form = {"inner_loss": inner_loss} if inner_loss is not None else {"fixed_point": fixed_point}
        estimator = AIDError(
            op, lambda w2: _damped(implicit_operator(w2, lam, wspec, lspec, **form), damping),
            lambda w2: _outer_grads(f, w2, lam)[1:], w, gw, gl, inner_loss is not None,
        )
    q = None
    if tol is None:
        v, sinfo, cross_v, lanczos = solve_once(solver, x0)
        if estimate:
            err = estimator(v, cross_v, lanczos)
        elif free_contraction:
            q = _solver_contraction(solver, sinfo, lanczos, arnoldi, x0 is None and pc is None,
                                    inner_loss is not None, gw[0])
    else:
        v, sinfo, cross_v, err = _meet_tol(solve_once, estimator, solver, x0, tol)
    hg = T.add(gl, cross_v)
    check_finite(hg, "the hypergradient")
    check_reached(hg, lspec, lambda: unused_hparams(outer_loss, inner_loss, fixed_point, w, lam, wspec, lspec))
    return hg, v, sinfo, op, fval, err, q


def _solver_contraction(solver: Solver, sinfo: Any, lanczos: list, arnoldi: list, cold: bool, optimality: bool,
                        like: torch.Tensor) -> float | None:
    """``q̂`` from what the linear solve gave for free (no extra product): CG's Lanczos
    tridiagonal (``1 − μ̂/L̂``, the extreme Ritz values of ``H``); GMRES's first Hessenberg
    matrix on the fixed-point form (``A = (I − ∂_wΦ)ᵀ``: ``q̂ = max |1 − θ|`` over its Ritz
    values θ, a spectral-radius estimate of ``∂_wΦ``); or a Richardson/Neumann run with step 1
    on the fixed-point form from ``v = 0``, whose residual after K iterations is
    ``(∂_wΦ)ᵀᴷ b`` (``q̂ = (‖r_K‖/‖b‖)^{1/K}``, the mean rate).  ``None`` for other solvers."""
    if isinstance(solver, GMRES) and not optimality and arnoldi:
        m, zero = len(arnoldi), torch.zeros((), dtype=like.real.dtype, device=like.device)
        hess = torch.stack([torch.stack([*col[:m], *[zero] * (m - len(col[:m]))]) for col in arnoldi], 1)
        if not bool(torch.isfinite(hess).all()):
            return None
        return float((1 - torch.linalg.eigvals(hess)).abs().max())
    if isinstance(solver, CG) and optimality:
        ritz = ritz_values(lanczos, like)
        if ritz is None:
            return None
        return float(1 - ritz[0] / ritz[1])
    if isinstance(solver, (FixedPoint, Neumann)) and not optimality and solver.step == 1 and cold \
            and sinfo.iterations > 0:
        return float(torch.as_tensor(sinfo.residual).clamp(min=0)) ** (1.0 / sinfo.iterations)
    return None


def _solve(op: ImplicitOperator, b: Leaves, solver: Solver, x0: Leaves | None, pc: Callable[[Leaves], Leaves] | None,
           lanczos: list | None, arnoldi: list | None = None) -> tuple[Leaves, Any]:
    """``solve_leaves`` on ``A v = b``; under a torch.func transform, on one flat vector.

    There every tensor op pays a batching-rule dispatch, and a Krylov iteration's vector
    updates and inner products are one op per leaf: on the concatenated leaves they are one
    op each, for a concatenation and a split per product.  Same iterates up to the order of
    the sums in the inner products."""
    rmatvec = op.rmatvec if isinstance(solver, NormalCG) else None
    if no_transform() or len(b) == 1:
        return solve_leaves(op.matvec, b, solver, x0, rmatvec, pc, lanczos, arnoldi)
    sizes, shapes = [t.numel() for t in b], [t.shape for t in b]

    def flat(leaves: Leaves) -> Leaves:
        return [torch.cat([t.flatten() for t in leaves])]

    def unflat(x: Leaves) -> Leaves:  # 1-d leaves need no reshape (under vmap each is a dispatch)
        return [t if len(shape) == 1 else t.reshape(shape) for t, shape in zip(x[0].split_with_sizes(sizes), shapes)]

    def on_flat(fn: Callable[[Leaves], Leaves] | None) -> Callable[[Leaves], Leaves] | None:
        return None if fn is None else lambda x: flat(fn(unflat(x)))

    x, sinfo = solve_leaves(on_flat(op.matvec), flat(b), solver, None if x0 is None else flat(x0),  # type: ignore[arg-type]
                            on_flat(rmatvec), on_flat(pc), lanczos, arnoldi)
    return unflat(x), sinfo


# first chunk of linear-solver iterations under tol=; later chunks are sized from the estimate
_FIRST_CHUNK = 8
_FIRST_CHUNK_WARM = 4  # from init= (e.g. the previous call's v), a few iterations tell how far it is
_MAX_ROUNDS = 6


def _meet_tol(solve_once, estimator, solver, x0, tol):
    """Linear-solver iterations in chunks until the estimated error is ≤ tol: the linear
    part of the estimate scales with the residual, so each chunk asks for the residual that
    brings it to ``tol − inner`` (with a margin of 2), warm-started from the previous ``v``."""
    if isinstance(solver, Dense):
        v, sinfo, cross_v, lanczos = solve_once(solver, x0)
        err = estimator(v, cross_v, lanczos)
        warn_error_above("hypergrad", err, tol, sinfo.iterations)
        return v, sinfo, cross_v, err
    if isinstance(solver, Neumann):  # continuing a Neumann sum is a warm-started Richardson iteration
        solver = FixedPoint(solver.maxiter, solver.tol, solver.step)
    cap, used, v, rel, rounds = solver.maxiter, 0, x0, 0.0, 0
    chunk = min(cap, _FIRST_CHUNK if x0 is None else _FIRST_CHUNK_WARM)
    while True:
        slv = replace(solver, maxiter=chunk, tol=rel)
        v, sinfo, cross_v, lanczos = solve_once(slv, v)
        used += sinfo.iterations
        rounds += 1
        err = estimator(v, cross_v, lanczos)
        total, inner, linear = worst(_t(err.total)), worst(_t(err.inner)), worst(_t(err.linear))
        if total <= tol or used >= cap or rounds >= _MAX_ROUNDS or not math.isfinite(total):
            break
        if inner >= 0.9 * tol:  # the linear part cannot help much: bring it to tol/2 and stop there
            target = 0.5 * tol
            if linear <= target:
                break
        else:
            target = 0.5 * (tol - inner)
        res = worst(_t(sinfo.residual))
        rel = res * target / linear if linear > 0 else 0.0
        chunk = cap - used
    sinfo = replace(sinfo, iterations=used)  # every chunk's products, the last chunk's residual
    warn_error_above("hypergrad", err, tol, used)
    return v, sinfo, cross_v, err


def _t(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x)



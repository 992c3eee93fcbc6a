"""An AID hypergradient whose whole solve is one ``torch.compile`` graph (opt-in).

:func:`bilevel.hypergrad` reads residuals on the host between iterations (its tolerance,
curvature and breakdown checks) and looks behind torch.func wrappers, so ``torch.compile``
runs it eagerly (a graph break at its entry).  Where the per-operation cost of eager
autograd and Python dominates — small problems, many calls, a GPU's launch overhead —
:func:`compiled_hypergrad` builds the AID step with exactly ``K`` iterations and no
data-dependent control flow from torch.func transforms, in the optimality form

    b = ∇_w f,   (H + δI) v = b  by K CG iterations from v = 0,   ∇F ≈ ∇_λ f − (∂²_{λw} g)ᵀ v,

with ``H v`` and ``(∂²_{λw} g)ᵀ v`` two pullbacks of one ``vjp`` of ``∇_w g``, or in the
fixed-point form ``w = Φ(w, λ)``

    v ← (∂_wΦ)ᵀ v − δv + b  K times from v = 0,   ∇F ≈ ∇_λ f + (∂_λΦ)ᵀ v,

with both products pullbacks of one ``vjp`` of ``Φ``; and compiles it as one graph
(``fullgraph=True``: a break would raise).  The trust policy runs after the graph on what it
returns — the true residual ``‖b − A v‖/‖b‖`` (every iteration's, in the fixed-point form),
whether any CG step met ``⟨p, (H + δI)p⟩ ≤ 0``, the inner residual and its scale,
finiteness — with one host read per call: the same errors and warnings as
:func:`bilevel.hypergrad` with ``CG(maxiter=K, tol=0)`` or ``FixedPoint(maxiter=K, tol=0)``,
except that an unconverged solve is judged against ``tol`` afterwards instead of stopping
early.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, vjp

from bilevel import _tree as T
from bilevel._checks import (
    SolverError,
    active_transforms,
    check_count,
    check_finite,
    check_inner_solution,
    check_input_finite,
    check_one_form,
    check_reached,
    check_residual_trend,
    check_shaped_like,
    check_tol,
    inner_scale,
    leaves_pair,
    no_transform,
    not_contraction,
    scalar,
    unused_hparams,
    warn_unconverged,
)
from bilevel.ift import HypergradInfo

__all__ = ["compiled_hypergrad"]

Leaves = list[torch.Tensor]


def _dot(x: Leaves, y: Leaves) -> torch.Tensor:
    return sum((a * b).sum() for a, b in zip(x, y))  # type: ignore[return-value]


def _outer(outer_loss: Callable[[Any, Any], torch.Tensor], wspec: Any, lspec: Any) -> Callable[..., torch.Tensor]:
    def f(wl: Leaves, ll: Leaves) -> torch.Tensor:
        return scalar(outer_loss(T.tree_unflatten(wl, wspec), T.tree_unflatten(ll, lspec)), "outer_loss")

    return f


def _aid_cg(outer_loss: Callable[[Any, Any], torch.Tensor], inner_loss: Callable[[Any, Any], torch.Tensor],
            wspec: Any, lspec: Any, K: int, damping: float) -> Callable[[Leaves, Leaves, Leaves], tuple[Any, ...]]:
    """The AID-CG step on leaves, as a pure function of tensors with a fixed K (traceable), from
    ``v = 0`` or from ``x0``."""

    f = _outer(outer_loss, wspec, lspec)

    def g(wl: Leaves, ll: Leaves) -> torch.Tensor:
        return scalar(inner_loss(T.tree_unflatten(wl, wspec), T.tree_unflatten(ll, lspec)), "inner_loss")

    def step(w: Leaves, lam: Leaves, x0: Leaves) -> tuple[Any, ...]:  # x0 = [] for a cold start
        fval = f(w, lam)
        gw, gl = grad(f, argnums=(0, 1))(w, lam)
        grad_w, pull = vjp(grad(g), w, lam)

        def A(v: Leaves) -> Leaves:
            return [hv + damping * vi for hv, vi in zip(pull(v)[0], v)]

        if x0:  # warm start: one product more, for the starting residual
            x = list(x0)
            r = [bi - ai for bi, ai in zip(gw, A(x))]
        else:
            x, r = [torch.zeros_like(t) for t in gw], list(gw)
        p = list(r)
        rr = _dot(r, r)
        bad = torch.zeros((), dtype=torch.bool, device=rr.device)
        for _ in range(K):
            Ap = A(p)
            pAp = _dot(p, Ap)
            # ⟨p, Ap⟩ ≤ 0 with p ≠ 0: A is not positive definite (judged after the graph)
            bad = bad | ((pAp <= 0) & (_dot(p, p) > 0))
            alpha = rr / torch.where(pAp > 0, pAp, torch.ones_like(pAp))
            alpha = torch.where(pAp > 0, alpha, torch.zeros_like(alpha))  # an exact solve: p = 0, no step
            x = [xi + alpha * pi for xi, pi in zip(x, p)]
            r = [ri - alpha * api for ri, api in zip(r, Ap)]
            rr_new = _dot(r, r)
            beta = rr_new / torch.where(rr > 0, rr, torch.ones_like(rr))
            p = [ri + beta * pi for ri, pi in zip(r, p)]
            rr = rr_new
        hx, cross = pull(x)  # one pullback for both: H x (the true residual) and the λ-part
        true_r = [bi - hi - damping * xi for bi, hi, xi in zip(gw, hx, x)]  # recomputed, not recurred
        bnorm = _dot(gw, gw).sqrt()
        residual = _dot(true_r, true_r).sqrt() / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
        hg = [a - b for a, b in zip(gl, cross)]
        inner = _dot(grad_w, grad_w).sqrt()
        hw = pull(w)[0]
        scale = _dot(hw, hw).sqrt()  # ‖H w‖: what the inner residual is measured against
        return hg, x, residual, bad, scale, inner, fval

    return step


def _aid_fp(outer_loss: Callable[[Any, Any], torch.Tensor], fixed_point: Callable[[Any, Any], Any],
            wspec: Any, lspec: Any, K: int, damping: float) -> Callable[[Leaves, Leaves, Leaves], tuple[Any, ...]]:
    """The AID-FP step on leaves: K Richardson iterations ``v ← v + (b − A v)`` from ``v = 0``
    (or ``x0``) on ``A = (1 + δ)I − (∂_wΦ)ᵀ`` (``v ← (∂_wΦ)ᵀ v − δv + b``), each residual ``b − A v``
    computed, not recurred; returns every residual norm for the contraction checks after the graph."""

    f = _outer(outer_loss, wspec, lspec)

    def phi(wl: Leaves, ll: Leaves) -> Leaves:
        return T.tree_flatten(fixed_point(T.tree_unflatten(wl, wspec), T.tree_unflatten(ll, lspec)))[0]

    def step(w: Leaves, lam: Leaves, x0: Leaves) -> tuple[Any, ...]:  # x0 = [] for a cold start
        fval = f(w, lam)
        gw, gl = grad(f, argnums=(0, 1))(w, lam)
        phi_w, pull = vjp(phi, w, lam)

        def residual(v: Leaves) -> tuple[Leaves, Leaves]:  # b − A v = b + (∂_wΦ)ᵀ v − (1 + δ) v, and (∂_λΦ)ᵀ v
            jv, cross = pull(v)
            return [bi + ji - (1.0 + damping) * vi for bi, ji, vi in zip(gw, jv, v)], cross

        x = list(x0) if x0 else [torch.zeros_like(t) for t in gw]
        r, cross = (residual(x)[0] if x0 else list(gw)), []
        norms = [_dot(r, r).sqrt()]
        for _ in range(K):  # K ≥ 1; the last pullback's λ-part is the hypergradient's: no extra product
            x = [xi + ri for xi, ri in zip(x, r)]
            r, cross = residual(x)
            norms.append(_dot(r, r).sqrt())
        hg = [a + b for a, b in zip(gl, cross)]
        shift = [p - wi for p, wi in zip(phi_w, w)]
        inner = _dot(shift, shift).sqrt()
        return hg, x, torch.stack(norms), _dot(gw, gw).sqrt(), inner, fval

    return step


def _judge_cg(residual: torch.Tensor, bad: torch.Tensor) -> float:
    """After a compiled CG solve: raise on non-positive curvature; the relative residual."""
    if bool(bad):
        raise SolverError("compiled_hypergrad: CG met non-positive curvature <p, (H + δI) p> <= 0: the inner "
                          "Hessian at params is not positive definite (are params a minimiser?). Pass damping=δ "
                          "> 0, or use bilevel.hypergrad with MINRES().")
    return float(residual)


def _judge_fp(norms: torch.Tensor, bnorm: torch.Tensor, v: Leaves, tol: float, damping: float) -> float:
    """After compiled fixed-point iterations: the trust policy's contraction checks on the residual
    norms ``‖b − A v_k‖``, k = 0…K (a blow-up, or growth / stagnation through the run), as for the
    eager Richardson solve; the relative residual."""
    check_finite([norms], "the residuals of the compiled fixed-point iterations")
    name = "compiled_hypergrad: the fixed-point iterations on ((1 + δ)I − ∂_wΦ)ᵀ v = ∇_w f"
    eps, start = torch.finfo(norms.dtype).eps, torch.maximum(norms[0], bnorm)
    if bool(norms.max() > 0.01 / eps * start):  # every digit cancelled: nothing can be trusted
        not_contraction(name, float(norms[0]), float(norms.max()), norms.numel() - 1, 1.0)
    # a residual at rounding level has converged, not stalled: ‖A‖ ≤ 2 + δ for a contraction ∂_wΦ
    floor = 64 * eps * ((2 + damping) * _dot(v, v).sqrt() + bnorm)
    check_residual_trend(name, list(norms.unbind()), torch.maximum(tol * bnorm, floor), 1.0)
    return float(norms[-1] / bnorm) if bool(bnorm > 0) else 0.0


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own.  torch.compile keeps one cache per code object, and
    every step built here shares ``step``'s code: each new closure (another compiled_hypergrad,
    another pytree structure) would be a recompile of that one cache, whose limit (8) then
    fails the ninth under ``fullgraph=True``.  A copy gives each step its own cache."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)


def _mv_as_mm(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.mm.default(A, x.unsqueeze(1)).squeeze(1)


def _inductor(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """inductor with two changes on CPU, where a solve is a chain of matrix–vector products:
    ``aten.mv`` is lowered to a BLAS ``mm`` call instead of inductor's own C++ reduction loop
    (1.8× slower than MKL's gemv at 2000×200, float64), and the code that calls the kernels
    is C++ (``cpp_wrapper``) instead of Python, whose per-kernel cost is most of a small
    solve's overhead.  Together: 1.40× → 1.04× the hand-coded floor at 2000×200,
    1.47× → 1.08× at 10000×1000 (``benchmarks/compile.py``).  Elsewhere (CUDA), plain inductor."""
    from torch._inductor.compile_fx import compile_fx  # imported late: inductor is heavy
    from torch._inductor.decomposition import select_decomp_table

    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in example_inputs):
        return compile_fx(gm, example_inputs)
    table = {**select_decomp_table(), torch.ops.aten.mv.default: _mv_as_mm}
    return compile_fx(gm, example_inputs, decompositions=table, config_patches={"cpp_wrapper": True})


def compiled_hypergrad(
    outer_loss: Callable[[Any, Any], torch.Tensor],
    *,
    inner_loss: Callable[[Any, Any], torch.Tensor] | None = None,
    fixed_point: Callable[[Any, Any], Any] | None = None,
    maxiter: int,
    tol: float = 1e-6,
    damping: float = 0.0,
    inner_tol: float | None = None,
    backend: str | Callable[..., Any] = "inductor",
) -> Callable[[Any, Any], tuple[Any, HypergradInfo]]:
    """``hypergrad_fn(params, hparams) -> (hypergrad, HypergradInfo)``: the AID hypergradient of
    :func:`bilevel.hypergrad` with the whole solve compiled as one graph, in either form:

    * ``inner_loss=g``: ``(H + δI) v = ∇_w f`` by K CG iterations (``CG(maxiter=K, tol=0)``);
    * ``fixed_point=Φ``: ``((1 + δ)I − ∂_wΦ)ᵀ v = ∇_w f`` by K fixed-point iterations
      ``v ← (∂_wΦ)ᵀ v − δv + ∇_w f`` from ``v = 0`` (``FixedPoint(maxiter=K, tol=0)``, AID-FP:
      a DEQ's backward), ``∇F ≈ ∇_λ f + (∂_λΦ)ᵀ v``.

    ``hypergrad_fn(params, hparams, init=v)`` starts the solve at ``v`` (e.g. ``info.v`` of the
    previous outer step: a warm start, one product more; a second graph, compiled on its first
    use).  ``maxiter``: K, the iterations every call runs (no early stop: no host read inside the
    graph).  ``tol``: afterwards, a relative residual ``‖b − A v‖/‖b‖`` above it warns
    (:class:`~bilevel.ConvergenceWarning`); ``inner_tol`` as for :func:`bilevel.hypergrad`.  A
    non-positive curvature met by CG raises :class:`~bilevel.SolverError` (damp the system,
    or use :func:`bilevel.hypergrad` with ``MINRES``); fixed-point residuals that grow or stall
    raise :class:`~bilevel.NotContractionError` (``∂_wΦ`` is not a contraction: use
    :func:`bilevel.hypergrad` with ``GMRES``); NaN/Inf and hyperparameters that reach nothing
    raise as there.  ``backend``: ``"inductor"`` (the default) generates code and needs a C++
    compiler on CPU, where it also keeps the matrix–vector products on BLAS and calls the
    kernels from C++ (compiles slower, runs at 1.03–1.05× a hand-coded step); any other value
    goes to ``torch.compile`` as given (``"aot_eager"`` only traces).

    Compile once, call many times: the first call for given shapes and dtypes compiles (seconds
    to a minute), later calls reuse the graph.  Data the losses close over is read when the
    graph runs: update a minibatch in place (``X.copy_(batch)``); binding a new tensor to the
    name makes torch.compile trace again.  Worth it for small problems and many calls;
    measured in ``benchmarks/compile.py``.  Reverse mode through the result is not supported:
    it is detached.
    """
    check_one_form(inner_loss, fixed_point)
    form = "inner_loss" if inner_loss is not None else "fixed_point"
    inner_fn: Callable[[Any, Any], Any] = inner_loss if inner_loss is not None else fixed_point  # type: ignore[assignment]
    if not callable(outer_loss) or not callable(inner_fn):
        raise TypeError(f"compiled_hypergrad: outer_loss and {form} should be functions (params, hparams).")
    K = check_count("compiled_hypergrad: maxiter", maxiter, 1)
    tol = check_tol("compiled_hypergrad: tol", tol)
    damping = check_tol("compiled_hypergrad: damping", damping)  # a finite float >= 0, as a tolerance
    if inner_tol is not None and inner_tol != math.inf:
        check_tol("compiled_hypergrad: inner_tol", inner_tol)
    solver = "CG (compiled)" if inner_loss is not None else "FixedPoint (compiled)"
    build = _aid_cg if inner_loss is not None else _aid_fp
    graphs: dict[tuple[Any, Any, bool], Callable[..., Any]] = {}  # one compiled step per structure and start

    def hypergrad_fn(params: Any, hparams: Any, init: Any = None) -> tuple[Any, HypergradInfo]:
        if not no_transform():  # torch.compile cannot be entered from inside vmap/grad/jvp
            raise NotImplementedError(
                f"compiled_hypergrad: called under torch.func {'/'.join(sorted(active_transforms()))}, which a "
                "compiled graph cannot be entered from. Use bilevel.hypergrad there (it runs under vmap, grad "
                "and jvp), or compile the whole transformed function yourself.")
        (w, wspec), (lam, lspec) = leaves_pair(params, hparams, "params")
        w, lam = [t.detach() for t in w], [t.detach() for t in lam]
        check_input_finite(w, "params")
        check_input_finite(lam, "hparams")
        x0: Leaves = []
        if init is not None:
            x0, ispec = T.tree_flatten(init)
            check_shaped_like(x0, ispec, w, wspec, "compiled_hypergrad: init", verb="should be")
            x0 = [t.detach() for t in x0]
            check_input_finite(x0, "init")
        key = (wspec, lspec, bool(x0))  # a cold and a warm start are two graphs
        if key not in graphs:
            # the functions once, eagerly: a wrong output (not a scalar, say) raises our message
            # here, not a torch.compile error that buries it
            with torch.no_grad():
                f0 = outer_loss(T.tree_unflatten(w, wspec), T.tree_unflatten(lam, lspec))
                g0 = inner_fn(T.tree_unflatten(w, wspec), T.tree_unflatten(lam, lspec))
            scalar(f0, "outer_loss")
            if inner_loss is not None:
                scalar(g0, "inner_loss")
            else:
                check_shaped_like(*T.tree_flatten(g0), w, wspec, "fixed_point")
            graphs[key] = torch.compile(_own_code(build(outer_loss, inner_fn, wspec, lspec, K, damping)),
                                        fullgraph=True,
                                        backend=_inductor if backend == "inductor" else backend)
        with torch.no_grad():
            hg, v, *checks, inner, fval = graphs[key](w, lam, x0)
        check_finite(v, f"the linear-system solution v ({solver}, {K} iterations)")
        check_finite(hg, "the hypergradient")
        res = _judge_cg(*checks[:2]) if inner_loss is not None else _judge_fp(*checks, v, tol, damping)
        converged = res <= tol
        if not converged:
            warn_unconverged("compiled_hypergrad", solver, K, res, tol, "Raise maxiter (iterations per call).")

        def scale_of() -> torch.Tensor:  # ‖H w‖ (CG: from the graph) or ‖w‖; where that is 0, the policy's
            if inner_loss is None:
                return inner_scale(w, None)
            scale = checks[2]
            if bool(scale > 0):
                return scale
            _, pull = vjp(grad(lambda wl, ll: scalar(inner_loss(T.tree_unflatten(wl, wspec),
                                                                 T.tree_unflatten(ll, lspec)), "inner_loss")), w, lam)
            return inner_scale(w, lambda u: list(pull(u)[0]))

        check_inner_solution("compiled_hypergrad", form, inner, scale_of, inner_tol)
        check_reached(hg, lspec, lambda: unused_hparams(outer_loss, inner_loss, fixed_point, w, lam, wspec, lspec))
        info = HypergradInfo(solver, K, res, converged, float(inner), float(fval), T.tree_unflatten(list(v), wspec),
                             damping=damping)
        return T.tree_unflatten(list(hg), lspec), info

    return hypergrad_fn

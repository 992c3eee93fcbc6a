"""Matrix-free linear solvers over pytrees of tensors.

Solves ``A x = b`` where ``A`` is only reachable through ``matvec(x) = A x`` (and, for
``NormalCG``, ``rmatvec(y) = Aᵀ y``).  A solver is a *value*: a small frozen dataclass
holding its options, passed to :func:`solve`.

All iterative solvers stop when the relative residual ``‖b − A x‖ / ‖b‖ ≤ tol`` or after
``maxiter`` matrix–vector products.  Scalars stay on the device; the tolerance is checked
every iteration on the CPU and every ``_CHECK_EVERY_ACCEL`` iterations on an accelerator,
so the loop does not stall a GPU.  Under ``torch.func.vmap`` the check is data dependent
and cannot run: the solvers then do exactly ``maxiter`` (guarded) iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bilevel import _tree as T
from bilevel._checks import (
    DIVERGENCE_FACTOR,
    NotContractionError,
    SingularSystemError,
    SolverError,
    check_count,
    check_finite,
    check_positive,
    check_tol,
    item,
    no_transform,
)

__all__ = [
    "FixedPoint",
    "Neumann",
    "CG",
    "MINRES",
    "GMRES",
    "NormalCG",
    "Dense",
    "Solver",
    "SolveInfo",
    "solve",
    "NotContractionError",
    "SingularSystemError",
    "SolverError",
]

_CHECK_EVERY_ACCEL = 8


def _check_options(name: str, maxiter: int, tol: float) -> None:
    check_count(f"{name}: maxiter", maxiter)
    check_tol(f"{name}: tol", tol)


@dataclass(frozen=True)
class FixedPoint:
    """Richardson iteration ``x ← x + step·(b − A x)``.

    For the fixed-point form ``A = I − (∂_wΦ)ᵀ`` and ``step=1`` this is AID-FP,
    ``v ← (∂_wΦ)ᵀ v + ∇_w f``; it converges iff ``‖I − step·A‖ < 1`` (a contraction).
    Accepts a warm start.
    """

    maxiter: int = 100
    tol: float = 1e-10
    step: float = 1.0

    def __post_init__(self) -> None:
        _check_options("FixedPoint", self.maxiter, self.tol)
        check_positive("FixedPoint: step", self.step)


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series ``x = step·Σ_{k<K} (I − step·A)^k b`` (K = maxiter).

    For ``A = I − (∂_wΦ)ᵀ``: ``v = Σ_{k<K} ((∂_wΦ)ᵀ)^k ∇_w f``.  Equal to ``FixedPoint``
    started at ``x = 0``; never warm-started.
    """

    maxiter: int = 100
    tol: float = 1e-10
    step: float = 1.0

    def __post_init__(self) -> None:
        _check_options("Neumann", self.maxiter, self.tol)
        check_positive("Neumann: step", self.step)


@dataclass(frozen=True)
class CG:
    """Conjugate gradient; ``A`` must be symmetric positive definite."""

    maxiter: int = 100
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _check_options("CG", self.maxiter, self.tol)


@dataclass(frozen=True)
class MINRES:
    """Minimum residual method; ``A`` symmetric, possibly indefinite."""

    maxiter: int = 100
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _check_options("MINRES", self.maxiter, self.tol)


@dataclass(frozen=True)
class GMRES:
    """Restarted GMRES(restart) for a general (non-symmetric) ``A``."""

    maxiter: int = 100
    tol: float = 1e-10
    restart: int = 30

    def __post_init__(self) -> None:
        _check_options("GMRES", self.maxiter, self.tol)
        check_count("GMRES: restart", self.restart, 1)


@dataclass(frozen=True)
class NormalCG:
    """CG on the normal equations ``AᵀA x = Aᵀb`` (CGLS); any ``A``, needs ``rmatvec``."""

    maxiter: int = 100
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _check_options("NormalCG", self.maxiter, self.tol)


@dataclass(frozen=True)
class Dense:
    """Materialise ``A`` (n matvecs) and solve it with LU; for small problems and tests."""


Solver = FixedPoint | Neumann | CG | MINRES | GMRES | NormalCG | Dense
_SOLVERS = (FixedPoint, Neumann, CG, MINRES, GMRES, NormalCG, Dense)
SYMMETRIC_SOLVERS = (CG, MINRES)


def check_solver(solver: Any) -> None:
    """Raise a ``TypeError`` unless ``solver`` is one of the solver values."""
    if isinstance(solver, type) and issubclass(solver, _SOLVERS):
        raise TypeError(
            f"solver should be a solver value, not the class {solver.__name__}: "
            f"write solver={solver.__name__}()."
        )
    if not isinstance(solver, _SOLVERS):
        names = ", ".join(f"bilevel.{s.__name__}()" for s in _SOLVERS)
        raise TypeError(f"solver should be one of {names}; got {solver!r}.")


@dataclass(frozen=True)
class SolveInfo:
    """What a solve did.

    ``iterations``: matrix–vector products with ``A`` (NormalCG: with ``A`` and ``Aᵀ``
    each); ``residual``: relative residual ``‖b − A x‖/‖b‖`` of the returned ``x``
    computed for every solver from its own recurrence);
    ``converged``: ``residual ≤ tol``.  Under ``vmap`` the last two are tensors.
    """

    solver: str
    iterations: int
    residual: float | torch.Tensor
    converged: bool | torch.Tensor


Leaves = list[torch.Tensor]
MatVec = Callable[[Leaves], Leaves]


class _Monitor:
    """Decides when to look at the residual (host sync) and whether it is small enough."""

    def __init__(self, like: torch.Tensor, bnorm: torch.Tensor, tol: float):
        self.every = 1 if like.device.type == "cpu" else _CHECK_EVERY_ACCEL
        self.thresh = tol * bnorm
        self.tol = tol
        self.batched = False

    def done(self, k: int, res: torch.Tensor) -> bool:
        if self.batched or (k % self.every):
            return False
        try:  # also with tol == 0: the solvers' other checks need to know about vmap
            small = bool(res <= self.thresh)
        except RuntimeError:  # data-dependent control flow under vmap: run to maxiter
            self.batched = True
            return False
        return small and self.tol != 0


_CG_CURVATURE = (
    "CG met non-positive curvature <p, A p> <= 0: A is not positive definite "
    "(for an inner_loss: its Hessian at params; are params a minimiser?). "
    "Use MINRES() for a symmetric indefinite A, GMRES() otherwise."
)


_PRECOND_NOT_SPD = (
    "CG: <r, M r> <= 0 for the preconditioner M: it is not positive definite. Pass an "
    "SPD approximation of A⁻¹ as precond (e.g. lbfgs's info.inverse_hessian), or none."
)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0 (a converged or broken-down Krylov step)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), 0 * num)


def _richardson(
    matvec: MatVec, b: Leaves, x: Leaves | None, step: float, maxiter: int, tol: float, name: str
) -> tuple[Leaves, int, torch.Tensor]:
    """x ← x + step·(b − A x); from x = 0 this sums the Neumann series."""
    bnorm = T.norm(b)
    mon = _Monitor(b[0], bnorm, tol)
    if x is None:
        x, r = T.zeros_like(b), list(b)  # A·0 = 0: no matvec spent
    else:
        r = T.sub(b, matvec(x))
    res = T.norm(r)
    start = torch.maximum(res, bnorm)
    k = 0
    while not mon.done(k, res) and k < maxiter:
        x = T.axpy(step, r, x)
        r = T.sub(b, matvec(x))
        res = T.norm(r)
        k += 1
        if not mon.batched and not (k % mon.every) and not bool(
            torch.isfinite(res) & (res <= DIVERGENCE_FACTOR * start)
        ):
            raise NotContractionError(
                f"{name} diverged: the residual grew from {item(start):.3g} to "
                f"{item(res):.3g} in {k} iterations, so the iteration map is not a "
                f"contraction (‖I − step·A‖ ≥ 1). For an inner_loss lower `step` "
                f"(it needs step < 2/λ_max(Hessian)) or use CG(); for a fixed_point "
                f"that is not a contraction use GMRES() or NormalCG()."
            )
    return x, k, res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))


def _records_graph(leaves: Leaves) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in leaves)


def _host_scalars(b: Leaves) -> bool:
    """CPU, no torch.func transform and nothing to differentiate through: the residual is
    read every iteration anyway, so the Krylov scalars can live on the host as Python
    floats; each update is then one fused op.  (As floats they carry no derivative, so a
    solve that autograd records keeps them as tensors.)"""
    return b[0].device.type == "cpu" and not b[0].is_complex() and no_transform() and not _records_graph(b)


class _GraphNeeded(Exception):
    """The operator's output is recorded by autograd: the scalars must stay tensors."""


def _cg(matvec: MatVec, b: Leaves, x: Leaves | None, maxiter: int, tol: float, precond: MatVec | None = None):
    # Preconditioned CG (M ≈ A⁻¹ SPD; M = I without precond): z = M r, ρ = <r, z>.
    if _host_scalars(b):
        try:
            return _cg_host(matvec, b, x, maxiter, tol, precond)
        except _GraphNeeded:  # found at the first product: start again on tensors
            pass
    bnorm = T.norm(b)
    mon = _Monitor(b[0], bnorm, tol)
    if x is None:
        x, r = T.zeros_like(b), list(b)
    else:
        r = T.sub(b, matvec(x))
    z = r if precond is None else precond(r)
    rho = T.vdot(r, z)
    rr = rho if precond is None else T.vdot(r, r)
    p = list(z)
    bad_curvature = torch.zeros((), dtype=torch.bool, device=b[0].device)
    bad_precond = bad_curvature
    noise = (1e3 * torch.finfo(bnorm.dtype).eps * bnorm) ** 2
    k = 0
    while not mon.done(k, rr.sqrt()) and k < maxiter:
        ap = matvec(p)
        pap = T.vdot(p, ap)
        # negative curvature only counts while the residual is above rounding level: at
        # convergence <p, Ap> is rounding noise and may be <= 0 on a positive definite A
        bad_curvature = bad_curvature | ((pap <= 0) & (rr > noise))
        if precond is not None:
            bad_precond = bad_precond | ((rho <= 0) & (rr > noise))
        alpha = _safe_div(rho, pap)
        x = T.axpy(alpha, p, x)
        r = T.axpy(-alpha, ap, r)
        z = r if precond is None else precond(r)
        rho_new = T.vdot(r, z)
        rr = rho_new if precond is None else T.vdot(r, r)
        p = T.axpy(_safe_div(rho_new, rho), p, z)
        rho = rho_new
        k += 1
        if not mon.batched and not (k % mon.every) and bool(bad_curvature | bad_precond):
            raise SolverError(_PRECOND_NOT_SPD if bool(bad_precond) else _CG_CURVATURE)
    return x, k, rr.sqrt() / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))


def _cg_host(
    matvec: MatVec, b: Leaves, x: Leaves | None, maxiter: int, tol: float, precond: MatVec | None = None
):
    """:func:`_cg` with its scalars as Python floats (same iterates, same checks)."""
    bnorm = T.norm(b).item()
    if x is None:
        x, r = T.zeros_like(b), list(b)
    else:
        r = T.sub(b, matvec(x))
    z = r if precond is None else precond(r)
    rho = T.vdot(r, z).item()
    rr = rho if precond is None else T.vdot(r, r).item()
    p = list(z)
    noise = (1e3 * torch.finfo(b[0].dtype).eps * bnorm) ** 2
    k = 0
    while not (tol != 0 and math.sqrt(rr) <= tol * bnorm) and k < maxiter:
        if precond is not None and rho <= 0 and rr > noise:
            raise SolverError(_PRECOND_NOT_SPD)
        ap = matvec(p)
        if k == 0 and _records_graph(ap + z + r):
            raise _GraphNeeded
        pap = T.vdot(p, ap).item()
        alpha = rho / pap if pap != 0 else 0.0
        x = T.axpy(alpha, p, x)
        r = T.axpy(-alpha, ap, r)
        z = r if precond is None else precond(r)
        rho_new = T.vdot(r, z).item()
        rr_old, rr = rr, rho_new if precond is None else T.vdot(r, r).item()
        p = T.axpy(rho_new / rho if rho != 0 else 0.0, p, z)
        rho = rho_new
        k += 1
        if pap <= 0 and rr_old > noise:  # see _cg: rounding-level curvature does not count
            raise SolverError(_CG_CURVATURE)
    res = math.sqrt(rr) / bnorm if bnorm > 0 else math.sqrt(rr)
    return x, k, torch.tensor(res, dtype=b[0].real.dtype)


def _minres(matvec: MatVec, b: Leaves, x: Leaves | None, maxiter: int, tol: float):
    # Paige & Saunders (1975), no preconditioner: Lanczos + QR by Givens rotations.
    bnorm = T.norm(b)
    mon = _Monitor(b[0], bnorm, tol)
    if x is None:
        x, r1 = T.zeros_like(b), list(b)
    else:
        r1 = T.sub(b, matvec(x))
    y, r2 = r1, r1
    beta = T.norm(r1)
    zero = torch.zeros_like(beta)
    oldb, dbar, epsln, phibar = zero, zero, zero, beta
    cs, sn = -torch.ones_like(beta), zero
    w, w2 = T.zeros_like(b), T.zeros_like(b)
    tiny = torch.finfo(beta.dtype).tiny
    k = 0
    while not mon.done(k, phibar.abs()) and k < maxiter:
        v = T.scale(_safe_div(torch.ones_like(beta), beta), y)
        y = matvec(v)
        if k > 0:
            y = T.axpy(-_safe_div(beta, oldb), r1, y)
        alfa = T.vdot(v, y)
        y = T.axpy(-_safe_div(alfa, beta), r2, y)
        r1, r2 = r2, y
        oldb, beta = beta, T.norm(y)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.clamp(torch.hypot(gbar, beta), min=tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = T.scale(1 / gamma, T.axpy(-delta, w2, T.axpy(-oldeps, w1, v)))
        x = T.axpy(phi, w, x)
        k += 1
    return x, k, phibar.abs() / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))


def _gmres(matvec: MatVec, b: Leaves, x: Leaves | None, maxiter: int, tol: float, restart: int):
    # Arnoldi (modified Gram–Schmidt) + Givens rotations, so |g_{j+1}| is the residual of
    # the j-th iterate and the tolerance is checked every step, not only at restarts.
    bnorm = T.norm(b)
    mon = _Monitor(b[0], bnorm, tol)
    if x is None:
        x, r = T.zeros_like(b), list(b)
    else:
        r = T.sub(b, matvec(x))
    res = T.norm(r)
    k = 0
    while not mon.done(k, res) and k < maxiter:
        beta = res
        basis = [T.scale(_safe_div(torch.ones_like(beta), beta), r)]
        rot: list[tuple[torch.Tensor, torch.Tensor]] = []
        cols: list[list[torch.Tensor]] = []
        g = [beta]
        for _ in range(min(restart, maxiter - k)):
            w = matvec(basis[-1])
            h = []
            for v in basis:
                hij = T.vdot(w, v)
                w = T.axpy(-hij, v, w)
                h.append(hij)
            hn = T.norm(w)
            basis.append(T.scale(_safe_div(torch.ones_like(hn), hn), w))
            for i, (c, s) in enumerate(rot):  # apply the previous rotations to the new column
                h[i], h[i + 1] = c * h[i] + s * h[i + 1], -s * h[i] + c * h[i + 1]
            den = torch.hypot(h[-1], hn)
            c, s = _safe_div(h[-1], den), _safe_div(hn, den)
            h[-1] = c * h[-1] + s * hn
            rot.append((c, s))
            g.append(-s * g[-1])
            g[-2] = c * g[-2]
            cols.append(h)
            k += 1
            res = g[-1].abs()
            if mon.done(k, res):
                break
        m = len(cols)
        upper = torch.stack([torch.stack(c + [torch.zeros_like(beta)] * (m - len(c))) for c in cols], 1)
        diag_ok = upper.diagonal() != 0
        upper = upper + torch.diag(torch.where(diag_ok, 0.0, 1.0).to(upper.dtype))
        coef = torch.linalg.solve_triangular(upper, torch.stack(g[:m]).unsqueeze(1), upper=True)[:, 0]
        coef = torch.where(diag_ok, coef, 0.0)
        for i in range(m):
            x = T.axpy(coef[i], basis[i], x)
        if k < maxiter and not mon.done(k, res):
            r = T.sub(b, matvec(x))  # restart from the true residual
            res = T.norm(r)
    return x, k, res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))


def _normal_cg(matvec: MatVec, rmatvec: MatVec, b: Leaves, x: Leaves | None, maxiter: int, tol: float):
    # CGLS: CG on AᵀA x = Aᵀb that keeps r = b − A x, so the reported residual is the true one.
    bnorm = T.norm(b)
    mon = _Monitor(b[0], bnorm, tol)
    if x is None:
        x, r = T.zeros_like(b), list(b)
    else:
        r = T.sub(b, matvec(x))
    z = rmatvec(r)
    p, zz = list(z), T.vdot(z, z)
    res = T.norm(r)
    k = 0
    while not mon.done(k, res) and k < maxiter:
        w = matvec(p)
        alpha = _safe_div(zz, T.vdot(w, w))
        x = T.axpy(alpha, p, x)
        r = T.axpy(-alpha, w, r)
        z = rmatvec(r)
        zz_new = T.vdot(z, z)
        p = T.axpy(_safe_div(zz_new, zz), p, z)
        zz = zz_new
        res = T.norm(r)
        k += 1
    return x, k, res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))


def _dense(matvec: MatVec, b: Leaves):
    sizes = [t.numel() for t in b]
    n = sum(sizes)
    eye = torch.eye(n, dtype=b[0].dtype, device=b[0].device)
    basis = [c.reshape(n, *t.shape) for c, t in zip(torch.split(eye, sizes, dim=1), b)]
    try:
        cols = torch.func.vmap(matvec)(basis)
    except Exception:  # a matvec vmap cannot batch: one column at a time
        per = [matvec([c[i] for c in basis]) for i in range(n)]
        cols = [torch.stack([p[j] for p in per]) for j in range(len(b))]
    mat = torch.cat([c.reshape(n, -1) for c in cols], dim=1).T  # column i = A e_i
    bflat = torch.cat([t.reshape(-1) for t in b])
    sol = torch.linalg.solve(mat, bflat)
    bnorm = torch.linalg.vector_norm(bflat)
    res = torch.linalg.vector_norm(bflat - mat @ sol) / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    x = [s.reshape(t.shape) for s, t in zip(torch.split(sol, sizes), b)]
    return x, n, res


def solve_leaves(
    matvec: MatVec,
    b: Leaves,
    solver: Solver,
    init: Leaves | None = None,
    rmatvec: MatVec | None = None,
    precond: MatVec | None = None,
) -> tuple[Leaves, SolveInfo]:
    """:func:`solve` on flat lists of leaves (no pytree handling); the core calls this."""
    check_solver(solver)
    name = type(solver).__name__
    if precond is not None and not isinstance(solver, CG):
        raise ValueError(f"precond is used by CG() only, not by {name}(); drop it or use CG().")
    if isinstance(solver, FixedPoint):
        x, k, res = _richardson(matvec, b, init, solver.step, solver.maxiter, solver.tol, name)
    elif isinstance(solver, Neumann):
        x, k, res = _richardson(matvec, b, None, solver.step, solver.maxiter, solver.tol, name)
    elif isinstance(solver, CG):
        x, k, res = _cg(matvec, b, init, solver.maxiter, solver.tol, precond)
    elif isinstance(solver, MINRES):
        x, k, res = _minres(matvec, b, init, solver.maxiter, solver.tol)
    elif isinstance(solver, GMRES):
        x, k, res = _gmres(matvec, b, init, solver.maxiter, solver.tol, solver.restart)
    elif isinstance(solver, NormalCG):
        if rmatvec is None:
            raise ValueError(
                "NormalCG needs rmatvec (y -> Aᵀy); pass rmatvec=..., or use GMRES(), "
                "which needs only matvec."
            )
        x, k, res = _normal_cg(matvec, rmatvec, b, init, solver.maxiter, solver.tol)
    else:
        x, k, res = _dense(matvec, b)
    tol = getattr(solver, "tol", 1e-8)
    converged = res <= max(tol, 1e-12) if isinstance(solver, Dense) else res <= tol
    return x, SolveInfo(name, k, item(res), item(converged))


def solve(
    matvec: Callable[[Any], Any],
    rhs: Any,
    solver: Solver = CG(),
    *,
    init: Any = None,
    rmatvec: Callable[[Any], Any] | None = None,
    precond: Callable[[Any], Any] | None = None,
) -> tuple[Any, SolveInfo]:
    """Solve ``A x = rhs`` matrix-free.

    ``matvec(x) = A x`` maps a pytree shaped like ``rhs`` to one of the same shape;
    ``rmatvec(y) = Aᵀ y`` is needed by ``NormalCG`` only.  ``init`` is a warm start
    (ignored by ``Neumann`` and ``Dense``).  ``precond(r) = M r`` with ``M ≈ A⁻¹``
    symmetric positive definite turns CG into preconditioned CG (CG only).  Returns ``(x, SolveInfo)``, ``x`` shaped
    like ``rhs``.  Raises :class:`NotContractionError` when a Richardson iteration
    diverges and :class:`SolverError` on NaN/Inf.
    """
    check_solver(solver)
    b, spec = T.tree_flatten(rhs)
    if not b or not all(isinstance(t, torch.Tensor) for t in b):
        raise TypeError(f"rhs should be a tensor or a pytree of tensors, got {T.describe(rhs)}.")
    mv = _checked(T.flat_fn(matvec, spec), b, "matvec")
    rmv = None if rmatvec is None else _checked(T.flat_fn(rmatvec, spec), b, "rmatvec")
    x0 = None
    if init is not None:
        x0, ispec = T.tree_flatten(init)
        if ispec != spec or any(a.shape != c.shape for a, c in zip(x0, b)):
            raise ValueError(
                f"init should have the structure of rhs ({T.describe(rhs)}), "
                f"not {T.describe(init)}."
            )
    pc = None if precond is None else _checked(T.flat_fn(precond, spec), b, "precond")
    x, info = solve_leaves(mv, b, solver, x0, rmv, pc)
    check_finite(x, "the solution of the linear system")
    return T.tree_unflatten(x, spec), info


def _checked(fn: MatVec, like: Sequence[torch.Tensor], name: str) -> MatVec:
    """Check, on the first call only, that ``fn`` returns leaves shaped like ``like``."""
    state = {"checked": False}

    def wrapped(x: Leaves) -> Leaves:
        out = fn(x)
        if not state["checked"]:
            state["checked"] = True
            if len(out) != len(like) or any(o.shape != c.shape for o, c in zip(out, like)):
                raise ValueError(
                    f"{name} should return a pytree shaped like rhs ({len(like)} leaves "
                    f"{[tuple(c.shape) for c in like]}), got {[tuple(o.shape) for o in out]}."
                )
        return out

    return wrapped

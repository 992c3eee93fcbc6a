"""Matrix-free linear solvers over pytrees of tensors.

Solves ``A x = b`` where ``A`` is only reachable through ``matvec(x) = A x`` (and, for
``NormalCG``, ``rmatvec(y) = Aᵀ y``).  A solver is a *value*: a small frozen dataclass
holding its options, passed to :func:`solve`.

All iterative solvers stop when the relative residual ``‖b − A x‖ / ‖b‖ ≤ tol`` or after
``maxiter`` matrix–vector products.  Scalars stay on the device; the tolerance is checked
every iteration on the CPU and every ``_CHECK_EVERY_ACCEL`` iterations on an accelerator,
so the loop does not stall a GPU.  Under ``torch.func.vmap`` the test reads every task's
residual: the loop stops when all have converged, and a converged task stops changing.
The reported residual is always the true one, checked at exit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from bilevel import _tree as T
from bilevel._checks import (
    NotContractionError,
    SingularSystemError,
    SolverError,
    check_converged,
    check_count,
    check_finite,
    check_positive,
    check_residual_trend,
    check_tol,
    checked_output,
    eager,
    info_pytree,
    is_batched,
    item,
    no_transform,
    not_contraction,
    values,
    worst,
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
    """Conjugate gradient; ``A`` must be symmetric positive definite.

    ``on_negative_curvature``: what to do when ``⟨p, A p⟩ ≤ 0`` (an indefinite ``A``, e.g.
    the Hessian of a network's loss away from a minimum): ``"raise"`` a
    :class:`SolverError` (default), or ``"stop"``: truncated CG (Steihaug), which returns
    the iterate built so far, the minimiser of ``½xᵀAx − bᵀx`` over the Krylov space where
    ``A`` was positive, sets ``SolveInfo.negative_curvature`` and warns that the tolerance
    was missed.  Combine it with damping (``hypergrad(..., damping=δ)``) rather than rely on it.
    """

    maxiter: int = 100
    tol: float = 1e-10
    on_negative_curvature: str = "raise"

    def __post_init__(self) -> None:
        _check_options("CG", self.maxiter, self.tol)
        if self.on_negative_curvature not in ("raise", "stop"):
            raise ValueError("CG: on_negative_curvature should be 'raise' or 'stop', "
                             f"not {self.on_negative_curvature!r}.")


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


@partial(info_pytree, static=("solver", "iterations"))  # returnable under vmap
@dataclass(frozen=True)
class SolveInfo:
    """What a solve did.

    ``iterations``: matrix–vector products with ``A`` (NormalCG: with ``A`` and ``Aᵀ``
    each, not counting the one that checks the residual at exit); ``residual``: the true
    relative residual ``‖b − A x‖/‖b‖`` of the returned ``x``, computed at exit (never a
    recurrence's estimate, which can drift from it by orders of magnitude);
    ``converged``: ``residual ≤ tol`` (or at the dtype's rounding floor,
    ``64·eps·(1 + ‖A x‖/‖b‖)``).  Under ``vmap`` the last two are per-row tensors.
    ``negative_curvature``: truncated CG (``on_negative_curvature="stop"``) stopped there.
    """

    solver: str
    iterations: int
    residual: float | torch.Tensor
    converged: bool | torch.Tensor
    negative_curvature: bool | torch.Tensor = False


Leaves = list[torch.Tensor]
MatVec = Callable[[Leaves], Leaves]


class _Monitor:
    """Decides when to look at the residual (a host sync) and whether it is small enough.

    Under ``vmap`` the residual is batched: :func:`~bilevel._checks.values` reads every row,
    so the loop stops once *every* task has converged, and :meth:`active` freezes the rows
    that have (their iterate stops changing while the others go on)."""

    def __init__(self, like: torch.Tensor, bnorm: torch.Tensor, tol: float):
        self.every = 1 if like.device.type == "cpu" else _CHECK_EVERY_ACCEL
        self.thresh = tol * bnorm
        self.tol = tol
        self.batched = is_batched(bnorm)

    def done(self, k: int, res: torch.Tensor) -> bool:
        if (k % self.every) or self.tol == 0:
            return False
        return bool(values(res <= self.thresh).all())

    def freeze(self, res: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """``coef`` where the row is still above tolerance, 0 where it has converged
        (only under vmap: unbatched, the loop stops instead)."""
        if not self.batched:
            return coef
        return torch.where(res > self.thresh, coef, torch.zeros_like(coef))


_CG_CURVATURE = (
    "CG met non-positive curvature <p, A p> <= 0: A is not positive definite "
    "(for an inner_loss: its Hessian at params; are params a minimiser?). "
    "Use MINRES() for a symmetric indefinite A, GMRES() otherwise, or damp the system."
)

_SINGULAR = (
    "{name}: the linear system is singular and inconsistent (relative residual {res:.2e} "
    "cannot be reduced: the Krylov space is exhausted). For a hypergradient this happens when "
    "a parameter reaches the outer loss but not the inner problem (a dead unit, a weight the "
    "inner loss ignores): its row of A is zero. Regularise the inner problem in every "
    "parameter (e.g. a small L2 term), or remove such parameters from params."
)

_PRECOND_NOT_SPD = (
    "CG: <r, M r> <= 0 for the preconditioner M: it is not positive definite. Pass an "
    "SPD approximation of A⁻¹ as precond (e.g. lbfgs's info.inverse_hessian), or none."
)

# relative size below which a Krylov quantity (<p, A p>, a new Arnoldi / Lanczos vector) is
# rounding noise: the Krylov space is exhausted (breakdown)
_BREAKDOWN = 1e3


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0 (a converged or broken-down Krylov step)."""
    return num / torch.where(den != 0, den, torch.full_like(den, math.inf))


def _relative(res: torch.Tensor, bnorm: torch.Tensor) -> torch.Tensor:
    return res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))


def _richardson(matvec: MatVec, b: Leaves, x: Leaves | None, step: float, maxiter: int, tol: float, name: str):
    """x ← x + step·(b − A x); from x = 0 this sums the Neumann series.  Its residual
    ``b − A x`` is computed, not recurred: the reported residual is the true one."""
    bnorm = T.norm(b)
    mon = _Monitor(b[0], bnorm, tol)
    if x is None:
        x, r = T.zeros_like(b), list(b)  # A·0 = 0: no matvec spent
    else:
        r = T.sub(b, matvec(x))
    res = T.norm(r)
    start = torch.maximum(res, bnorm)
    # a contraction's residual can grow transiently (non-normal A), but once it has grown by
    # 1/(100·eps) the iterates cancel away every digit: no answer can be trusted any more
    blowup = 0.01 / torch.finfo(res.dtype).eps
    anorm = torch.zeros_like(res)  # ‖A(x_k − x_{k−1})‖ / ‖x_k − x_{k−1}‖, a lower bound of ‖A‖
    history = [res]
    k = 0
    while not mon.done(k, res) and k < maxiter:
        x = T.axpy(mon.freeze(res, torch.tensor(step, dtype=res.dtype)) if mon.batched else step, r, x)
        r_old, r = r, T.sub(b, matvec(x))
        anorm = torch.maximum(anorm, _safe_div(T.norm(T.sub(r_old, r)), step * res))
        res = T.norm(r)
        history.append(res)
        k += 1
        if not (k % mon.every):
            check_finite([res], f"the residual of {name}")
            if bool(values(res > blowup * start).any()):
                not_contraction(name, worst(start), worst(res), k, step)
    floor = 64 * torch.finfo(res.dtype).eps * (anorm * T.norm(x) + bnorm)
    check_residual_trend(name, history, torch.maximum(mon.thresh, floor), step)
    return x, k, _relative(res, bnorm), None, anorm


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


def _cg(matvec: MatVec, b: Leaves, x: Leaves | None, maxiter: int, tol: float, precond: MatVec | None = None,
        lanczos: list | None = None, truncated: list | None = None):
    # Preconditioned CG (M ≈ A⁻¹ SPD; M = I without precond): z = M r, ρ = <r, z>.
    # ``lanczos``: a list that receives (α_k, β_k, live_k) of every iteration (the Lanczos
    # tridiagonal of A comes free with them: bilevel.error.ritz_values; live_k: the residual
    # was above rounding, else the coefficients are noise).  ``truncated``: None raises at
    # negative curvature; a list stops there instead (truncated CG) and receives the flag
    if _host_scalars(b):
        try:
            return _cg_host(matvec, b, x, maxiter, tol, precond, lanczos, truncated)
        except _GraphNeeded:  # found at the first product: start again on tensors
            if lanczos is not None:
                lanczos.clear()
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
    noise = (1e3 * torch.finfo(bnorm.dtype).eps * bnorm) ** 2
    eps = torch.finfo(bnorm.dtype).eps
    anorm = torch.zeros_like(bnorm)  # largest Rayleigh quotient seen: a lower bound of ‖A‖
    # failure flags stay on the device and are read with the residual (every mon.every
    # iterations): no extra host sync per iteration on an accelerator
    bad_neg = bad_null = bad_pc = torch.zeros((), dtype=torch.bool, device=bnorm.device)
    halted = torch.zeros_like(bnorm, dtype=torch.bool)  # truncated CG: rows stopped at negative curvature
    k = 0
    while not mon.done(k, rr.sqrt()) and k < maxiter:
        ap = matvec(p)
        pap, pp = T.vdot(p, ap), T.vdot(p, p)
        anorm = torch.maximum(anorm, _safe_div(pap, pp))
        # negative curvature only counts while the residual is above rounding level: at
        # convergence <p, Ap> is rounding noise and may be <= 0 on a positive definite A
        live = rr > noise
        broken = live & (pap <= _BREAKDOWN * eps * pp * anorm)
        if mon.every == 1 and not bool(values(broken).any()):  # read every iteration anyway: ‖A p‖ only if needed
            neg = broken
        else:
            neg = broken & ~_in_null_space(T.vdot(ap, ap), pp, anorm, eps)
        if truncated is not None:  # stop the row here: its iterate and residual stay as they are
            halted, neg = halted | neg, neg & False
        bad_neg, bad_null = bad_neg | neg, bad_null | (broken & ~neg & ~halted)
        if precond is not None:
            bad_pc = bad_pc | ((rho <= 0) & live)
        alpha = mon.freeze(rr.sqrt(), _safe_div(rho, pap))
        if truncated is not None:
            alpha = torch.where(halted, torch.zeros_like(alpha), alpha)
        x = T.axpy(alpha, p, x)
        r = T.axpy(-alpha, ap, r)
        z = r if precond is None else precond(r)
        rho_new = T.vdot(r, z)
        rr = rho_new if precond is None else T.vdot(r, r)
        beta = _safe_div(rho_new, rho)
        p = T.axpy(beta, p, z)
        if lanczos is not None:  # with whether the residual was above rounding (else the coefficients are noise)
            lanczos.append((_safe_div(rho, pap), beta, live))
        rho = rho_new
        k += 1
        if not (k % mon.every) and bool(values(bad_neg | bad_null | bad_pc).any()):
            if bool(values(bad_pc).any()):
                raise SolverError(_PRECOND_NOT_SPD)
            _cg_failed(bool(values(bad_neg).any()), worst(_relative(rr.sqrt(), bnorm)))
        if truncated is not None and not (k % mon.every) and bool(values(halted).all()):
            break
    if truncated is not None:
        truncated.append(halted)
    return x, k, _relative(rr.sqrt(), bnorm), None, anorm


def _in_null_space(apap: Any, pp: Any, anorm: Any, eps: float) -> Any:
    """‖A p‖² at rounding level of ‖A‖²‖p‖²: p lies in the null space of A."""
    return apap <= _BREAKDOWN * eps * anorm**2 * pp


def _cg_failed(negative: bool, res: float) -> None:
    """<p, A p> ≈ 0 or < 0: with A p ≈ 0 too p lies in the null space (singular A:
    SingularSystemError); otherwise A is not positive definite (SolverError)."""
    if negative:
        raise SolverError(_CG_CURVATURE)
    raise SingularSystemError(_SINGULAR.format(name="CG", res=res))


def _cg_host(
    matvec: MatVec, b: Leaves, x: Leaves | None, maxiter: int, tol: float, precond: MatVec | None = None,
    lanczos: list | None = None, truncated: list | None = None,
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
    eps = torch.finfo(b[0].dtype).eps
    noise = (1e3 * eps * bnorm) ** 2
    anorm = 0.0
    k = 0
    while not (tol != 0 and math.sqrt(rr) <= tol * bnorm) and k < maxiter:
        if precond is not None and rho <= 0 and rr > noise:
            raise SolverError(_PRECOND_NOT_SPD)
        ap = matvec(p)
        if k == 0 and _records_graph(ap + z + r):
            raise _GraphNeeded
        pap, pp = T.vdot(p, ap).item(), T.vdot(p, p).item()
        anorm = max(anorm, pap / pp if pp > 0 else 0.0)
        if rr > noise and pap <= _BREAKDOWN * eps * pp * anorm:  # rounding-level curvature does not count
            negative = not _in_null_space(T.vdot(ap, ap).item(), pp, anorm, eps)
            if negative and truncated is not None:  # truncated CG: the iterate so far is the answer
                truncated.append(True)
                break
            _cg_failed(negative, math.sqrt(rr) / bnorm)
        alpha = rho / pap if pap != 0 else 0.0
        rr_old = rr
        x = T.axpy(alpha, p, x)
        r = T.axpy(-alpha, ap, r)
        z = r if precond is None else precond(r)
        rho_new = T.vdot(r, z).item()
        rr = rho_new if precond is None else T.vdot(r, r).item()
        p = T.axpy(rho_new / rho if rho != 0 else 0.0, p, z)
        if lanczos is not None:
            lanczos.append((alpha, rho_new / rho if rho != 0 else 0.0, rr_old > noise))
        rho = rho_new
        k += 1
    res = math.sqrt(rr) / bnorm if bnorm > 0 else math.sqrt(rr)
    if truncated is not None and not truncated:
        truncated.append(False)
    return x, k, torch.tensor(res, dtype=b[0].real.dtype), None, torch.tensor(anorm, dtype=b[0].real.dtype)


def _minres(matvec: MatVec, b: Leaves, x: Leaves | None, maxiter: int, tol: float):
    # Paige & Saunders (1975), no preconditioner: Lanczos + QR by Givens rotations.  A new
    # Lanczos vector of rounding size means the Krylov space is exhausted (breakdown): then
    # the iterate is final, and if its residual is not small the system is inconsistent.
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
    eps = torch.finfo(beta.dtype).eps
    anorm = zero
    broke = torch.zeros((), dtype=torch.bool, device=beta.device) | (beta == 0)
    k = 0
    while not mon.done(k, phibar.abs()) and k < maxiter and not (k % mon.every == 0 and bool(values(broke).all())):
        v = T.scale(_safe_div(torch.ones_like(beta), beta), y)
        y = matvec(v)
        if k > 0:
            y = T.axpy(-_safe_div(beta, oldb), r1, y)
        alfa = T.vdot(v, y)
        y = T.axpy(-_safe_div(alfa, beta), r2, y)
        r1, r2 = r2, y
        oldb, beta = beta, T.norm(y)
        anorm = torch.maximum(anorm, torch.maximum(alfa.abs(), beta))  # entries of the tridiagonal T_k
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.hypot(gbar, beta)
        # γ of rounding size: this direction adds nothing (A is singular on the Krylov space)
        ok = (gamma > _BREAKDOWN * eps * anorm) & ~broke
        gamma = torch.where(ok, gamma, torch.ones_like(gamma))
        cs = torch.where(ok, gbar / gamma, cs)
        sn = torch.where(ok, beta / gamma, sn)
        phi = mon.freeze(phibar.abs(), torch.where(ok, cs * phibar, zero))
        phibar = torch.where(ok, sn * phibar, phibar)
        w1, w2 = w2, w
        w = T.scale(torch.where(ok, 1 / gamma, zero), T.axpy(-delta, w2, T.axpy(-oldeps, w1, v)))
        x = T.axpy(phi, w, x)
        broke = broke | (beta <= _BREAKDOWN * eps * anorm)
        k += 1
    return x, k, _relative(phibar.abs(), bnorm), broke, anorm


def _gmres(matvec: MatVec, b: Leaves, x: Leaves | None, maxiter: int, tol: float, restart: int,
           arnoldi: list | None = None):
    # Arnoldi (modified Gram–Schmidt) + Givens rotations, so |g_{j+1}| is the residual of
    # the j-th iterate and the tolerance is checked every step, not only at restarts.  A new
    # Arnoldi vector of rounding size is a breakdown (the Krylov space is invariant): the
    # cycle's iterate is then the best the space holds, and a row that has converged (under
    # vmap) stops adding directions, so it cannot pick up noise while the others go on.
    bnorm = T.norm(b)
    mon = _Monitor(b[0], bnorm, tol)
    eps = torch.finfo(bnorm.dtype).eps
    if x is None:
        x, r = T.zeros_like(b), list(b)
    else:
        r = T.sub(b, matvec(x))
    res = T.norm(r)
    broke = torch.zeros((), dtype=torch.bool, device=bnorm.device) | (res == 0)
    anorm = torch.zeros_like(bnorm)
    k = 0
    while not mon.done(k, res) and k < maxiter and not bool(values(broke).all()):
        beta = res
        basis = [T.scale(_safe_div(torch.ones_like(beta), beta), r)]
        rot: list[tuple[torch.Tensor, torch.Tensor]] = []
        cols: list[list[torch.Tensor]] = []
        g = [beta]
        live = ~broke
        for _ in range(min(restart, maxiter - k)):
            w = matvec(basis[-1])
            wnorm = T.norm(w)
            anorm = torch.maximum(anorm, wnorm)  # ‖A v‖, ‖v‖ = 1
            h = []
            for v in basis:
                hij = T.vdot(w, v)
                w = T.axpy(-hij, v, w)
                h.append(hij)
            hn = T.norm(w)
            if arnoldi is not None and k < restart:  # the first cycle's Hessenberg: Ritz values of A, free
                arnoldi.append([*h, hn])
            # breakdown, or a row that has converged: no further direction for that row
            live = live & (hn > _BREAKDOWN * eps * wnorm)
            if mon.batched:
                live = live & (res > mon.thresh)
            hn = torch.where(live, hn, torch.zeros_like(hn))
            basis.append(T.scale(_safe_div(live.to(hn.dtype), hn), w))
            for i, (c, s) in enumerate(rot):  # apply the previous rotations to the new column
                h[i], h[i + 1] = c * h[i] + s * h[i + 1], -s * h[i] + c * h[i + 1]
            den = torch.hypot(h[-1], hn)
            c, s = _safe_div(h[-1], den), _safe_div(hn, den)
            c = torch.where(den > 0, c, torch.ones_like(c))
            h[-1] = c * h[-1] + s * hn
            rot.append((c, s))
            g.append(-s * g[-1])
            g[-2] = c * g[-2]
            cols.append(h)
            k += 1
            res = g[-1].abs()
            if mon.done(k, res) or (k % mon.every == 0 and not bool(values(live).any())):
                break
        broke = broke | ~live
        m = len(cols)
        upper = torch.stack([torch.stack(c + [torch.zeros_like(beta)] * (m - len(c))) for c in cols], 1)
        # a diagonal entry of rounding size: A is singular on this Krylov space; that
        # direction gets no coefficient rather than a huge one
        diag = upper.diagonal()
        diag_ok = diag.abs() > _BREAKDOWN * eps * diag.abs().max()
        upper = upper + torch.diag(torch.where(diag_ok, 0.0, 1.0).to(upper.dtype))
        rhs = torch.where(diag_ok, torch.stack(g[:m]), 0.0)
        coef = torch.linalg.solve_triangular(upper, rhs.unsqueeze(1), upper=True)[:, 0]
        coef = torch.where(diag_ok, coef, 0.0)
        for i in range(m):
            x = T.axpy(coef[i], basis[i], x)
        r = T.sub(b, matvec(x))  # restart (or finish) from the true residual
        res = T.norm(r)
    return x, k, _relative(res, bnorm), broke, anorm


def _normal_cg(matvec: MatVec, rmatvec: MatVec, b: Leaves, x: Leaves | None, maxiter: int, tol: float):
    # CGLS: CG on AᵀA x = Aᵀb that keeps r = b − A x.  When Aᵀr vanishes while r does not,
    # x is a least-squares solution of an inconsistent system (reported as a breakdown).
    bnorm = T.norm(b)
    mon = _Monitor(b[0], bnorm, tol)
    if x is None:
        x, r = T.zeros_like(b), list(b)
    else:
        r = T.sub(b, matvec(x))
    z = rmatvec(r)
    p, zz = list(z), T.vdot(z, z)
    res = T.norm(r)
    scale = _safe_div(zz.sqrt(), res)  # ‖Aᵀr₀‖/‖r₀‖ ≤ ‖A‖
    k = 0
    while not mon.done(k, res) and k < maxiter:
        w = matvec(p)
        ww = T.vdot(w, w)
        scale = torch.maximum(scale, _safe_div(ww, T.vdot(p, p)).sqrt())  # ‖A p‖/‖p‖ ≤ ‖A‖
        alpha = mon.freeze(res, _safe_div(zz, ww))
        x = T.axpy(alpha, p, x)
        r = T.axpy(-alpha, w, r)
        z = rmatvec(r)
        zz_new = T.vdot(z, z)
        p = T.axpy(_safe_div(zz_new, zz), p, z)
        zz = zz_new
        res = T.norm(r)
        k += 1
    broke = zz.sqrt() <= math.sqrt(torch.finfo(bnorm.dtype).eps) * scale * res
    return x, k, _relative(res, bnorm), broke, scale


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
    check_finite([mat], "the materialised matrix of the linear system (Dense)")
    try:
        sol = torch.linalg.solve(mat, bflat)
    except torch.linalg.LinAlgError:  # exactly singular: the minimum-norm least-squares solution
        sol = torch.linalg.pinv(mat) @ bflat
    x = [s.reshape(t.shape) for s, t in zip(torch.split(sol, sizes), b)]
    # LU solves any nonsingular system to rounding: a residual above it means singular
    # and inconsistent (checked at exit like the Krylov breakdowns)
    broke = torch.ones((), dtype=torch.bool, device=bflat.device)
    return x, n, None, broke, torch.linalg.matrix_norm(mat, ord=2)


def _true_residual(matvec: MatVec, b: Leaves, x: Leaves) -> torch.Tensor:
    """``‖b − A x‖/‖b‖`` (one matvec, not recorded by autograd)."""
    with torch.no_grad():
        ax = matvec([t.detach() for t in x])
        return _relative(T.norm(T.sub([t.detach() for t in b], ax)), T.norm(b).detach())


def _floor(anorm: torch.Tensor, x: Leaves, b: Leaves) -> torch.Tensor:
    """The relative residual ``64·eps·(‖A‖‖x‖ + ‖b‖)/‖b‖`` that rounding alone leaves to a
    backward-stable solve (‖A‖ estimated by the solver): no solver reaches below it, so it
    counts as converged, and a breakdown above it means a singular system."""
    with torch.no_grad():
        bnorm = T.norm(b).detach()
        eps = torch.finfo(bnorm.dtype).eps
        return 64 * eps * (1 + _relative(anorm.detach() * T.norm([t.detach() for t in x]), bnorm))


def solve_leaves(
    matvec: MatVec,
    b: Leaves,
    solver: Solver,
    init: Leaves | None = None,
    rmatvec: MatVec | None = None,
    precond: MatVec | None = None,
    lanczos: list | None = None,
    arnoldi: list | None = None,
) -> tuple[Leaves, SolveInfo]:
    """:func:`solve` on flat lists of leaves (no pytree handling); the core calls this.

    Every solver's reported residual is the true one, ``‖b − A x‖/‖b‖`` at the returned
    ``x`` (one extra matvec for the Krylov solvers, whose recurrences can drift from it);
    ``converged`` means it is within ``tol`` (or at the rounding floor of the dtype).
    A Krylov breakdown that leaves the residual large raises :class:`SingularSystemError`.
    ``lanczos``: a list that CG fills with its coefficients ``(α_k, β_k, live_k)``, and
    ``arnoldi`` one that GMRES fills with the columns ``[h_0j, …, h_jj, h_{j+1,j}]`` of its first
    cycle's Hessenberg matrix (other solvers leave them empty), for the spectrum estimates of
    :mod:`bilevel.error`.
    """
    check_solver(solver)
    name = type(solver).__name__
    if precond is not None and not isinstance(solver, CG):
        raise ValueError(f"precond is used by CG() only, not by {name}(); drop it or use CG().")
    if b and not b[0].is_floating_point():
        raise TypeError(f"{name}: the right-hand side should hold floating-point tensors, not {b[0].dtype}.")
    negative: Any = False
    if isinstance(solver, FixedPoint):
        x, k, res, broke, anorm = _richardson(matvec, b, init, solver.step, solver.maxiter, solver.tol, name)
    elif isinstance(solver, Neumann):
        x, k, res, broke, anorm = _richardson(matvec, b, None, solver.step, solver.maxiter, solver.tol, name)
    elif isinstance(solver, CG):
        truncated = None if solver.on_negative_curvature == "raise" else []
        x, k, res, broke, anorm = _cg(matvec, b, init, solver.maxiter, solver.tol, precond, lanczos, truncated)
        negative = truncated[-1] if truncated else False
    elif isinstance(solver, MINRES):
        x, k, res, broke, anorm = _minres(matvec, b, init, solver.maxiter, solver.tol)
    elif isinstance(solver, GMRES):
        x, k, res, broke, anorm = _gmres(matvec, b, init, solver.maxiter, solver.tol, solver.restart, arnoldi)
    elif isinstance(solver, NormalCG):
        if rmatvec is None:
            raise ValueError(
                "NormalCG needs rmatvec (y -> Aᵀy); pass rmatvec=..., or use GMRES(), "
                "which needs only matvec."
            )
        x, k, res, broke, anorm = _normal_cg(matvec, rmatvec, b, init, solver.maxiter, solver.tol)
    else:
        x, k, res, broke, anorm = _dense(matvec, b)
    tol = getattr(solver, "tol", 0.0)
    if not isinstance(solver, (FixedPoint, Neumann)) and k > 0:  # Richardson's residual is already true
        res = _true_residual(matvec, b, x)
    check_finite(x, f"the solution of the linear system ({name}, {k} iterations)")
    check_finite([res], f"the residual of the linear system ({name}, {k} iterations)")
    converged = res <= torch.clamp(_floor(anorm, x, b), min=tol)
    # a breakdown leaves the best solution the Krylov space holds: a singular, inconsistent
    # system when the residual stays large, rounding on an ill-conditioned one (κ·eps above the
    # floor) when it is below √eps — then it only missed tol, and the caller warns
    singular = broke & ~converged & (res > torch.finfo(res.dtype).eps ** 0.5) if broke is not None else None
    if singular is not None and bool(values(singular).any()):
        raise SingularSystemError(_SINGULAR.format(name=name, res=worst(torch.where(converged, 0 * res, res))))
    conv = item(converged)
    if isinstance(negative, torch.Tensor):
        negative = item(negative)
    if isinstance(conv, torch.Tensor) and not isinstance(negative, torch.Tensor):  # per row under vmap
        negative = torch.full_like(conv, bool(negative))
    return x, SolveInfo(name, k, item(res), conv, negative)


@eager  # under torch.compile: runs eagerly (a graph break), never mis-traced
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
    symmetric positive definite turns CG into preconditioned CG (CG only).  Returns
    ``(x, SolveInfo)``, ``x`` shaped like ``rhs``; ``info.residual`` is the true relative
    residual ``‖rhs − A x‖/‖rhs‖`` at ``x``.

    Warns (:class:`~bilevel.ConvergenceWarning`) when it is above ``tol``.  Raises
    :class:`NotContractionError` when a Richardson iteration diverges (fast or slowly),
    :class:`SingularSystemError` for a singular, inconsistent system, and
    :class:`SolverError` on NaN/Inf or non-positive curvature in CG.
    """
    check_solver(solver)
    b, spec = T.tree_flatten(rhs)
    if not b or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in b):
        raise TypeError(f"rhs should be a floating-point tensor or a pytree of them, got {T.describe(rhs)}.")
    mv = checked_output(T.flat_fn(matvec, spec), b, "matvec")
    rmv = None if rmatvec is None else checked_output(T.flat_fn(rmatvec, spec), b, "rmatvec")
    x0 = None
    if init is not None:
        x0, ispec = T.tree_flatten(init)
        if ispec != spec or any(a.shape != c.shape for a, c in zip(x0, b)):
            raise ValueError(
                f"init should have the structure of rhs ({T.describe(rhs)}), "
                f"not {T.describe(init)}."
            )
    pc = None if precond is None else checked_output(T.flat_fn(precond, spec), b, "precond")
    x, info = solve_leaves(mv, b, solver, x0, rmv, pc)
    check_finite(x, "the solution of the linear system")
    check_converged("solve", info, getattr(solver, "tol", 0.0), "Raise maxiter, or use a faster solver (CG/GMRES).")
    return T.tree_unflatten(x, spec), info

"""A-posteriori error estimates of AID hypergradients (what :func:`bilevel.hypergrad` reports
as ``info.error_estimate`` with ``estimate=True``, and uses for ``tol=``; opt-in: the
default ``estimate=False`` computes none).

Write ``A`` for the IFT system matrix at the point ``ŵ`` the hypergradient is computed at
(``A = H = ∇²_w g``, optimality form; ``A = (I − ∂_wΦ)ᵀ``, fixed-point form), ``C`` for the
λ-part (``cross(v) = −(∂²_{λw} g)ᵀ v`` or ``(∂_λΦ)ᵀ v``), ``b = ∇_w f`` and
``G(w) = ∇_λ f(w) + cross_w(A(w)⁻¹ ∇_w f(w))`` for the hypergradient with an *exact* linear
solve at ``w``; ``∇F(λ) = G(w*)``.  The returned ``ĝ = ∇_λ f + cross(v̂)`` splits as

    ĝ − ∇F = cross(v̂ − A⁻¹b)            (linear-system error)
           + G(ŵ) − G(w*)                (inner error)

(Grazzi, Franceschi, Pontil, Salzo, ICML 2020, Thm. 1 bounds both for a q-contraction Φ).

**Krylov estimates of A⁻¹z.**  Arnoldi (Lanczos when ``A`` is symmetric) on ``A y = z``
from ``z``: 2 steps, and up to 8 while the unsolved part still exceeds half the solved one
or the smallest Ritz value is still falling (by more than 10% in the last step),
give the minimal-residual ``y_m`` in the Krylov space, the exact remaining residual
``r_m``, and Ritz values of ``A``; then ``‖A⁻¹z − y_m‖ ≤ ‖r_m‖/s_min`` with ``s_min`` the
smallest Ritz modulus seen (all runs, and CG's own Lanczos tridiagonal when the solver is
CG: its coefficients give it for free).

**Linear-system term.**  ``v̂ − A⁻¹b = −A⁻¹ r`` with ``r = b − A v̂`` the true residual;
with ``y_m`` the Krylov estimate of ``A⁻¹r``:

    ‖cross(A⁻¹r)‖ ≈ ‖cross(y_m)‖ + ‖C‖ ‖r_m‖ / s_min

``‖C‖`` measured along ``v̂`` and ``y_m`` (and, for the inner term, at ``w'`` too).

**Inner term.**  To first order ``w* − ŵ = e := A_in⁻¹ s`` with ``A_in = H``,
``s = −∇_w g(ŵ)`` (optimality form: a Newton step) or ``A_in = I − ∂_wΦ``,
``s = Φ(ŵ) − ŵ`` (fixed-point form).  The Krylov estimate gives ``e_m ≈ e`` and a tail
``t = ‖s − A_in e_m‖/s_min``; ``‖ŵ − w*‖ ≈ ‖e_m‖ + t`` (``inner_distance``: the classical
``‖∇_w g‖/μ`` or ``‖Φ(ŵ) − ŵ‖/(1 − q)`` bound with the part of ``s`` inside the Krylov
space solved instead of bounded).  The change of ``G`` over that step is measured by finite
differences at ``w' = ŵ + e_m`` (the operator and the outer gradient at ``w'``): these take
the place of the Lipschitz constants of ``∇f``, ``∂Φ``, ``∂²g`` of the a-priori bounds,
along the actual error direction.  With ``Δ_λ = ∇_λ f(w') − ∇_λ f(ŵ) + cross_{w'}(v̂) −
cross_ŵ(v̂)``, ``Δ_w = ∇_w f(w') − ∇_w f(ŵ) − (A(w') − A(ŵ)) v̂`` and ``u_m`` the Krylov
estimate of ``A(w')⁻¹Δ_w`` (residual ``ρ``):

    ‖G(ŵ) − G(w*)‖ ≈ (‖Δ_λ + cross_{w'}(u_m)‖ + ‖C‖ ρ / s_min) · (1 + t/‖e_m‖)

**Margin.**  Both terms are multiplied by :data:`MARGIN` (2.5), calibrated on the test
instances (see there).

**Contraction.**  ``contraction`` is ``q̂``: the largest Ritz modulus of ``∂_wΦ``
(fixed-point form: a spectral-radius estimate, at most ``‖∂_wΦ‖``), or ``1 − μ̂/L̂``
(optimality form: the rate of gradient descent with step ``1/L̂`` on ``g``), with ``μ̂, L̂``
the extreme Ritz values of ``H`` (``eig_min``, ``eig_max``).

**What it is, and is not.**  An *estimate* of an upper bound, not a guarantee: Ritz values
approach the extreme eigenvalues from inside the spectrum (``s_min`` can be far above the
smallest eigenvalue when ``r`` or ``s`` hardly touch its eigenvector: then the estimate is
too low, as for a few gradient steps from 0 at κ = 1e3), the finite differences are
first-order (too high far from ``w*`` on nonlinear problems, or before a Lasso support is
identified).  It assumes the IFT setting: ``A`` invertible at and near ``ŵ`` (``g``
strongly convex near ``w*``, or Φ a contraction), ``f`` and ``g``/Φ smooth (or piecewise
smooth and on the right piece).  Cost (``ErrorEstimate.products``): three Krylov runs of
2–8 products, 5 more products with ``A`` and the λ-part, and one gradient of ``f``
and of ``g`` (or one Φ) at ``w'``: 13–31 products in all, paid only when asked for
(``hypergrad(..., estimate=True)`` or ``tol=``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from bilevel import _tree as T
from bilevel._checks import info_number, info_pytree, values

__all__ = ["ErrorEstimate", "AIDError", "ritz_values", "krylov_inverse"]

Leaves = list[torch.Tensor]

# Both parts are multiplied by this margin, for what cheap Krylov probes and first-order
# differences miss: Ritz values lie inside the spectrum (the smallest one above λ_min), and a
# hypergradient map that is bilinear in (w, v) (ridge: −e^λ ⊙ w ⊙ v) changes by more than its
# linearisation when w is far.  2.5 is calibrated on tests/error_instances.py (five
# families, κ = 2 … 1e4): without it the estimate is below the true error in ~17% of the
# instances, with it in ~3%, while staying within 10× of it in ~94%.
MARGIN = 2.5


@partial(info_pytree, static=("products",))  # returnable under vmap
@dataclass(frozen=True)
class ErrorEstimate:
    """An a-posteriori estimate of ``‖ĝ − ∇F(λ)‖`` (Euclidean over all hparams leaves).

    ``total = inner + linear``; ``inner_distance`` estimates ``‖ŵ − w(λ)‖``,
    ``linear_distance`` estimates ``‖v̂ − v*(ŵ)‖``; ``contraction`` is ``q̂`` (see
    :mod:`bilevel.error`); ``eig_min``/``eig_max``: smallest/largest modulus of a Ritz value
    of the system matrix ``A``; ``products``: the extra products the estimate cost.
    Floats, or per-task tensors under ``vmap``.
    """

    total: float | torch.Tensor
    inner: float | torch.Tensor
    linear: float | torch.Tensor
    inner_distance: float | torch.Tensor
    linear_distance: float | torch.Tensor
    contraction: float | torch.Tensor
    eig_min: float | torch.Tensor
    eig_max: float | torch.Tensor
    products: int


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den; 0 where num == 0 (also when den == 0: nothing to divide), inf where only den is."""
    ok = den != 0
    out = num / torch.where(ok, den, torch.ones_like(den))
    return torch.where(num == 0, torch.zeros_like(out), torch.where(ok, out, torch.full_like(out, float("inf"))))


def _inv(x: torch.Tensor) -> torch.Tensor:
    """1/x, and 0 where x == 0 (a zero vector stays zero when normalised)."""
    return torch.where(x != 0, 1 / torch.where(x != 0, x, torch.ones_like(x)), torch.zeros_like(x))


def ritz_values(lanczos: Sequence[tuple[Any, ...]], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Smallest and largest Ritz value of ``A`` from CG's coefficients ``(α_k, β_k, live_k)``.

    CG's Lanczos tridiagonal: ``T_jj = 1/α_j + β_{j−1}/α_{j−1}``,
    ``T_{j,j+1} = √β_j / α_j`` (Saad, Iterative Methods, §6.7.3), over the iterations whose
    residual was above rounding (``live_k``; later ones are noise: their rows are replaced
    by copies of ``T_00``, which adds no new Ritz value).  ``None`` when there are no
    coefficients; NaN values when an entry is not finite (a broken-down or frozen vmap row).
    """
    if not lanczos:
        return None
    k = len(lanczos)
    dtype, device = like.real.dtype, like.device
    alpha = torch.stack([torch.as_tensor(c[0], dtype=dtype, device=device) for c in lanczos])
    beta = torch.stack([torch.as_tensor(c[1], dtype=dtype, device=device) for c in lanczos])
    live = torch.stack([torch.as_tensor(c[2] if len(c) > 2 else True, device=device) for c in lanczos])
    live = live & (torch.cumsum((~live).to(torch.int64), 0) == 0)  # live up to the first dead iteration
    alpha = torch.where(live, alpha, torch.ones_like(alpha))
    beta = torch.where(live, beta, torch.zeros_like(beta))
    inv = 1 / alpha
    diag = inv + torch.cat([torch.zeros_like(inv[:1]), beta[:-1] * inv[:-1]])
    diag = torch.where(live, diag, diag[0])
    off = beta[:-1].clamp(min=0).sqrt() * inv[:-1]
    off = torch.where(live[1:], off, torch.zeros_like(off))
    tri = torch.diag_embed(diag) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    ok = torch.isfinite(tri).all() & (alpha > 0).all() & live[0]
    tri = torch.where(ok, tri, torch.eye(k, dtype=dtype, device=device))
    eig = torch.linalg.eigvalsh(tri)
    nan = torch.full_like(eig[0], float("nan"))
    return torch.where(ok, eig[0], nan), torch.where(ok, eig[-1], nan)


@dataclass(frozen=True)
class _Krylov:
    y: Leaves  # approximate A⁻¹ z in the Krylov space of z
    residual: torch.Tensor  # ‖z − A y‖ (exact in exact arithmetic: from the Hessenberg)
    eig_min: torch.Tensor  # smallest modulus of a Ritz value (NaN: no information)
    eig_max: torch.Tensor  # largest modulus
    rate_max: torch.Tensor  # largest |1 − θ| over the Ritz values θ (the contraction of I − A)
    steps: int  # products spent


def _analyse(hess: torch.Tensor, beta: torch.Tensor, alive: torch.Tensor, symmetric: bool):
    """Ritz values and the minimal-residual coefficients of an Arnoldi run ((m+1)×m Hessenberg)."""
    m = hess.shape[1]
    # a dead direction (breakdown: the Krylov space is invariant, or z = 0) adds a zero
    # column; its diagonal gets the Rayleigh quotient of z so it adds no spurious Ritz value
    square = hess[:m]
    square = square + torch.diag_embed(torch.where(alive, torch.zeros_like(square.diagonal()), square[0, 0]))
    finite = torch.isfinite(square).all()
    square = torch.where(finite, square, torch.eye(m, dtype=square.dtype, device=square.device))
    eig = torch.linalg.eigvalsh(0.5 * (square + square.T)) if symmetric else torch.linalg.eigvals(square)
    # minimal residual in the space: min ‖β e₁ − H̄ c‖ (normal equations; m is tiny)
    rhs = torch.cat([beta[None], torch.zeros_like(hess[1:, 0])])
    gram = hess.T @ hess
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    reg = (torch.finfo(beta.dtype).eps * gram.diagonal().abs().max() + torch.finfo(beta.dtype).tiny) * eye
    coef = torch.linalg.solve(gram + reg, hess.T @ rhs)
    res = torch.linalg.vector_norm(rhs - hess @ coef)
    return eig, coef, res, finite


def krylov_inverse(apply: Callable[[Leaves], Leaves], z: Leaves, steps: int, symmetric: bool,
                   max_steps: int | None = None) -> _Krylov:
    """Arnoldi (full orthogonalisation; Lanczos when ``symmetric``) on ``A y = z``: the
    minimal-residual ``y`` in the Krylov space, its residual norm, and the Ritz values of
    ``A`` there.  ``steps`` products with ``A``, and up to ``max_steps`` while the unsolved
    part (residual / smallest Ritz modulus) still exceeds half the solved part ``‖y‖`` — the
    tail bound is then the estimate's weakest link.  No data-dependent stop under vmap
    unless every row agrees (values are read behind the transform)."""
    max_steps = steps if max_steps is None else max(steps, max_steps)
    beta = T.norm(z)
    basis = [T.scale(_inv(beta), z)]
    cols: list[list[torch.Tensor]] = []
    m, prev = 0, None
    while True:
        w = apply(basis[-1])
        col = []
        for v in basis:  # modified Gram–Schmidt, twice (the basis is tiny; keeps it orthogonal)
            h = T.vdot(w, v)
            w = T.axpy(-h, v, w)
            col.append(h)
        for i, v in enumerate(basis):
            h = T.vdot(w, v)
            w = T.axpy(-h, v, w)
            col[i] = col[i] + h
        hn = T.norm(w)
        col.append(hn)
        cols.append(col)
        basis.append(T.scale(_inv(hn), w))
        m += 1
        hess = torch.stack([torch.stack(c + [torch.zeros_like(beta)] * (m + 1 - len(c))) for c in cols], 1)
        alive = torch.stack([beta] + [c[-1] for c in cols[: m - 1]]) > 0  # the norms basis[i] was scaled by
        eig, coef, res, finite = _analyse(hess, beta, alive, symmetric)  # m×m: no product
        smallest = eig.abs().min()
        # the tail bound trusts the smallest Ritz value: only once it has settled (it falls
        # toward λ_min as the space grows, fastest while the space is still meeting new modes)
        settled = smallest >= 0.9 * prev if prev is not None else torch.zeros_like(smallest, dtype=torch.bool)
        prev = smallest
        if m < steps:
            continue
        if m >= max_steps:
            break
        tail = _div(res, smallest)
        if bool(values(((tail <= 0.5 * torch.linalg.vector_norm(coef)) & settled) | ~(beta > 0)).all()):
            break
    y = T.zeros_like(z)
    for i in range(m):
        y = T.axpy(coef[i], basis[i], y)
    mods, rate = eig.abs(), (1 - eig).abs()
    known = (beta > 0) & finite
    nan = torch.full_like(beta, float("nan"))
    return _Krylov(y, res, torch.where(known, mods.min(), nan), torch.where(known, mods.max(), nan),
                   torch.where(known, rate.max(), nan), m)


def _nanmin(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = torch.where(torch.isnan(out), x, torch.where(torch.isnan(x), out, torch.minimum(out, x)))
    return out


def _nanmax(*xs: torch.Tensor) -> torch.Tensor:
    return -_nanmin(*[-x for x in xs])


class AIDError:
    """The estimate of the module docstring for AID hypergradients at one point ``w``.

    ``optimality``: ``A = H`` (symmetric); else ``A = (I − ∂_wΦ)ᵀ``, or ``A = (∂_w F)ᵀ`` with
    ``root=True`` (then ``contraction`` is NaN).

    ``op``: the :class:`~bilevel.ift.ImplicitOperator` at ``w``; ``op_at(w')`` builds it at
    another point; ``outer_grads(w') = (∇_w f, ∇_λ f)`` at ``w'``; ``b = ∇_w f(w)`` and
    ``gl = ∇_λ f(w)``.  The inner part (Krylov step toward ``w*`` and the operator at
    ``w' = w + e``) is computed on the first call and reused by later ones, so re-estimating
    after more linear-solver iterations (``tol=``) costs two Krylov runs and 5 products.
    """

    def __init__(self, op: Any, op_at: Callable[[Leaves], Any],
                 outer_grads: Callable[[Leaves], tuple[Leaves, Leaves]], w: Leaves, b: Leaves, gl: Leaves,
                 optimality: bool, steps: int = 2,
                 max_steps: int = 8, root: bool = False):
        self.op, self.op_at, self.outer_grads = op, op_at, outer_grads
        self.w, self.b, self.gl, self.optimality, self.steps = w, b, gl, optimality, steps
        self.max_steps, self.root = max_steps, root
        self._inner: tuple[Any, ...] | None = None
        self.products = 0

    def _inner_part(self) -> tuple[Any, ...]:
        if self._inner is None:
            op = self.op
            # the inner system: H e = −∇g, (I − ∂_wΦ) e = Φ(w) − w or (∂_w F) e = −F (a Newton
            # step); e ≈ w* − w to first order
            if self.optimality:
                inner = krylov_inverse(op.matvec, [-t for t in op.inner_vector], self.steps, True, self.max_steps)
            else:
                s = [-t for t in op.inner_vector] if self.root else list(op.inner_vector)
                inner = krylov_inverse(op.rmatvec, s, self.steps, False, self.max_steps)
            w2 = T.add(self.w, inner.y)
            op2 = self.op_at(w2)
            gw2, gl2 = self.outer_grads(w2)
            self._inner = (inner, op2, gw2, gl2)
            self.products += inner.steps + 2  # Arnoldi, ∇f and ∇g (or Φ) at w'
        return self._inner

    def __call__(self, v: Leaves, cross_v: Leaves, lanczos: Sequence[tuple[Any, ...]] = ()) -> ErrorEstimate:
        """The estimate for ``ĝ = gl + cross_v``, ``cross_v = cross(v)``; ``lanczos``: CG's
        coefficients of the solve that gave ``v`` (if any)."""
        with torch.no_grad():
            return self._estimate(v, cross_v, lanczos)

    def _estimate(self, v: Leaves, cross_v: Leaves, lanczos: Sequence[tuple[Any, ...]]) -> ErrorEstimate:
        op, b, optimality, steps = self.op, self.b, self.optimality, self.steps
        inner, op2, gw2, gl2 = self._inner_part()
        av = op.matvec(v)
        r = T.sub(b, av)  # the true residual of v
        lin = krylov_inverse(op.matvec, r, steps, optimality, self.max_steps)
        ritz = ritz_values(lanczos, b[0])
        nan = torch.full_like(inner.residual, float("nan"))
        cg_min, cg_max = ritz if ritz is not None else (nan, nan)
        s_min = _nanmin(inner.eig_min, lin.eig_min, cg_min)
        s_max = _nanmax(inner.eig_max, lin.eig_max, cg_max)
        s_min = torch.where(torch.isnan(s_min), torch.ones_like(s_min), s_min)  # all vectors 0: no error

        # ‖C‖ along two directions
        cross_y = op.cross(lin.y)
        v_norm, y_norm, cross_y_norm = T.norm(v), T.norm(lin.y), T.norm(cross_y)
        c_norm = torch.maximum(_div(T.norm(cross_v), v_norm), _div(cross_y_norm, y_norm))
        lin_tail = _div(lin.residual, s_min)
        linear = cross_y_norm + c_norm * lin_tail
        linear_distance = y_norm + lin_tail

        e_norm = T.norm(inner.y)
        inner_tail = _div(inner.residual, s_min)
        cross2_v = op2.cross(v)
        d_lam = T.add(T.sub(gl2, self.gl), T.sub(cross2_v, cross_v))
        d_w = T.sub(T.sub(gw2, b), T.sub(op2.matvec(v), av))
        # G(w') − G(ŵ) = Δ_λ + cross_{w'}(v(w') − v̂), v(w') − v̂ ≈ A(w')⁻¹ Δ_w (the same Krylov
        # estimate, at w'); the λ-part's size is taken at both points (it may grow toward w*)
        shift = krylov_inverse(op2.matvec, d_w, steps, optimality, self.max_steps)
        s_min = _nanmin(s_min, shift.eig_min)
        cross_shift = op2.cross(shift.y)
        c_norm2 = torch.maximum(torch.maximum(c_norm, _div(T.norm(cross2_v), v_norm)),
                                _div(T.norm(cross_shift), T.norm(shift.y)))
        # first order in e: the measured change scaled by (‖e_m‖ + tail)/‖e_m‖ for the unsolved part
        grow = 1 + _div(inner_tail, e_norm)
        inner_err = (T.norm(T.add(d_lam, cross_shift)) + c_norm2 * _div(shift.residual, s_min)) * grow
        inner_err = torch.where((e_norm == 0) & (inner_tail > 0), torch.full_like(inner_err, float("inf")),
                                inner_err)
        if optimality:
            contraction = 1 - _div(s_min, s_max)
        elif self.root:  # ∂_w F of a root condition is no I − ∂_wΦ: there is no contraction to report
            contraction = torch.full_like(s_min, float("nan"))
        else:
            contraction = _nanmax(inner.rate_max, lin.rate_max)
        self.products += lin.steps + shift.steps + 5  # A v for r, cross(y), and at w': A v, cross v, cross
        inner_err, linear = MARGIN * inner_err, MARGIN * linear
        return ErrorEstimate(
            info_number(inner_err + linear), info_number(inner_err), info_number(linear),
            info_number(e_norm + inner_tail), info_number(linear_distance), info_number(contraction),
            info_number(s_min), info_number(s_max), self.products,
        )


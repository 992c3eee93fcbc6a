"""Proximal operators whose autograd derivative is a conservative Jacobian, and the
proximal-gradient fixed-point map built from them.

For a convex regulariser ``r``, ``prox_{t r}(u) = argmin_x ½‖x − u‖² + t·r(x)`` is
1-Lipschitz, so the proximal-gradient map

    Φ(w, λ) = prox_{η r_λ}(w − η ∇_w g(w, λ))

is a contraction in ``w`` with factor ``q ≤ max |1 − η·eig(∇²_w g)|`` when ``g`` is
μ-strongly convex and L-smooth and ``0 < η < 2/L``; its fixed point is the minimiser of
``g + r_λ``.  Pass it to :func:`bilevel.hypergrad` (``fixed_point=``) or to
:func:`bilevel.unroll` (as the step).

**Kinks.**  Every operator here selects its smooth piece with ``torch.where`` on a *strict*
inequality, so autograd differentiates one piece.  At a tie (``|u_i| = t`` for
soft-thresholding, ``u_i`` on a bound of the box, ``‖u_g‖ = t_g`` for the group Lasso,
``u_i = τ`` for the simplex) the coordinate counts as zeroed / clipped: its derivative
w.r.t. ``u`` is 0 and the bound / threshold gets the derivative of the constant piece.
These selections are elements of the Clarke Jacobian and define a conservative Jacobian
(Bolte & Pauwels, 2021), which is what ITD and AID need to converge in the nonsmooth case
(Bolte, Pauwels & Vaiter, 2022; Grazzi, Pontil & Salzo, ICML 2024).  Off ties — almost
everywhere — it is the ordinary Jacobian.

Strengths (thresholds, L2 weights, radii) must be ``≥ 0`` and are checked on every call;
parametrise them as ``exp(λ)`` to keep ``λ`` unconstrained.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad, jvp

from bilevel import _tree as T
from bilevel._checks import scalar

__all__ = [
    "soft_threshold",
    "prox_elastic_net",
    "prox_group_lasso",
    "project_box",
    "project_nonnegative",
    "project_simplex",
    "ProximalGradient",
    "proximal_gradient",
]

Number = float | torch.Tensor


def _all(cond: torch.Tensor | bool) -> bool:
    """bool(cond.all()), or True under vmap where the data cannot be looked at."""
    if not isinstance(cond, torch.Tensor):
        return bool(cond)
    try:
        return bool(cond.all())
    except RuntimeError:  # batched under vmap
        return True


def _check_strength(value: Number, name: str, positive: bool = False) -> None:
    """Raise ValueError for a negative (or NaN/Inf) strength."""
    if isinstance(value, torch.Tensor):
        # one host sync; NaN fails both comparisons
        ok = _all(((value > 0) if positive else (value >= 0)) & (value < math.inf))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    else:
        raise TypeError(f"{name} should be a float or a tensor, not {type(value).__name__}.")
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(
            f"{name} should be finite and {bound} (got {_show(value)}). Parametrise a "
            f"regularisation strength as exp(λ) to keep it positive for any real λ."
        )


def _show(value: Number) -> str:
    if isinstance(value, torch.Tensor):
        try:
            if value.numel() <= 6:
                return str(value.detach().tolist())
            return f"min {value.detach().min().item():.3g}, NaN: {bool(value.isnan().any())}"
        except RuntimeError:
            return "a batched tensor"
    return repr(value)


def soft_threshold(u: torch.Tensor, threshold: Number) -> torch.Tensor:
    """``prox_{t‖·‖₁}(u) = sign(u)·max(|u| − t, 0)``, elementwise; ``t = threshold ≥ 0``.

    ``threshold`` is a float or a tensor broadcastable to ``u`` (one per coordinate).
    Derivative: ``1`` w.r.t. ``u_i`` and ``−sign(u_i)`` w.r.t. ``t_i`` where ``|u_i| > t_i``,
    ``0`` elsewhere (ties included).
    """
    _check_strength(threshold, "soft_threshold: threshold")
    # "not ≤" rather than ">": a NaN in u stays NaN instead of being zeroed
    active = ~(u.abs() <= threshold)
    return torch.where(active, u - threshold * torch.sign(u), torch.zeros_like(u))


def prox_elastic_net(u: torch.Tensor, l1: Number, l2: Number) -> torch.Tensor:
    """``prox`` of ``x ↦ l1‖x‖₁ + (l2/2)‖x‖²``: ``soft_threshold(u, l1) / (1 + l2)``.

    For the proximal-gradient step with step η pass ``l1 = η·α₁``, ``l2 = η·α₂``.
    """
    _check_strength(l2, "prox_elastic_net: l2")
    return soft_threshold(u, l1) / (1 + l2)


def prox_group_lasso(u: torch.Tensor, threshold: Number, groups: torch.Tensor) -> torch.Tensor:
    """``prox`` of ``x ↦ Σ_g t_g ‖x_g‖₂``: block soft-thresholding ``u_g·max(0, 1 − t_g/‖u_g‖)``.

    ``groups`` is an integer tensor shaped like ``u`` giving each entry's group id in
    ``[0, G)``; ``threshold`` is a float or a tensor of shape ``(G,)`` (one per group).
    Groups with ``‖u_g‖ ≤ t_g`` (ties included) are set to 0 with zero derivative.
    """
    _check_strength(threshold, "prox_group_lasso: threshold")
    if not isinstance(groups, torch.Tensor) or groups.dtype not in (torch.int32, torch.int64):
        raise TypeError("prox_group_lasso: groups should be an integer tensor of group ids.")
    if groups.shape != u.shape:
        raise ValueError(
            f"prox_group_lasso: groups should be shaped like u {tuple(u.shape)}, "
            f"not {tuple(groups.shape)}."
        )
    if isinstance(threshold, torch.Tensor) and threshold.ndim > 0:
        if threshold.ndim != 1:
            raise ValueError("prox_group_lasso: threshold should be a scalar or of shape (G,).")
        n_groups = threshold.shape[0]
    else:
        n_groups = int(groups.max()) + 1
    ids = groups.reshape(-1).long()
    sq = torch.zeros(n_groups, dtype=u.dtype, device=u.device).index_add(0, ids, u.reshape(-1) ** 2)
    t = threshold if isinstance(threshold, torch.Tensor) else torch.as_tensor(threshold, dtype=u.dtype, device=u.device)
    active = ~(sq <= t * t)  # ‖u_g‖ > t_g (t_g ≥ 0), and NaN stays NaN
    # sqrt only where active: sqrt'(0) = ∞ would turn the masked zero gradient into NaN.
    norm = torch.sqrt(torch.where(active, sq, torch.ones_like(sq)))
    scale = torch.where(active, 1 - t / norm, torch.zeros_like(sq))
    return u * scale[ids].reshape(u.shape)


def project_box(u: torch.Tensor, lower: Number = -math.inf, upper: Number = math.inf) -> torch.Tensor:
    """Projection onto ``{x : lower ≤ x ≤ upper}`` (bounds broadcastable to ``u``).

    Derivative: ``1`` w.r.t. ``u_i`` strictly inside, ``1`` w.r.t. the bound that clips
    ``u_i`` (ties count as clipped), ``0`` otherwise.
    """
    for b, name in ((lower, "lower"), (upper, "upper")):
        if isinstance(b, torch.Tensor):
            bad = not _all(~torch.isnan(b))
        else:
            bad = not isinstance(b, (int, float)) or math.isnan(b)
        if bad:
            raise ValueError(f"project_box: {name} should be a number or tensor without NaN.")
    if not _all(torch.as_tensor(lower) <= torch.as_tensor(upper)):
        raise ValueError("project_box: lower should be <= upper everywhere (the box is empty).")
    lo = torch.as_tensor(lower, dtype=u.dtype, device=u.device)
    hi = torch.as_tensor(upper, dtype=u.dtype, device=u.device)
    return torch.where(u <= lo, lo, torch.where(u >= hi, hi, u))


def project_nonnegative(u: torch.Tensor) -> torch.Tensor:
    """Projection onto ``{x ≥ 0}``: ``max(u, 0)``, derivative ``1`` where ``u > 0`` else ``0``."""
    return torch.where(u <= 0, torch.zeros_like(u), u)  # NaN stays NaN


def project_simplex(u: torch.Tensor, radius: Number = 1.0) -> torch.Tensor:
    """Projection onto ``{x ≥ 0, Σ x = radius}`` along the last dimension.

    ``x = max(u − τ, 0)`` with ``τ = (Σ_{i∈S} u_i − radius)/|S|`` and ``S = {i : u_i > τ}``
    (Held, Wolfe & Crowder 1974; sort-based).  Derivative, on the support ``S``:
    ``∂x_S/∂u_S = I − 11ᵀ/|S|``, ``∂x_S/∂radius = 1/|S|``; zero off ``S`` (ties included).
    """
    _check_strength(radius, "project_simplex: radius", positive=True)
    if u.ndim == 0:
        raise ValueError("project_simplex: u should have at least one dimension.")
    s = torch.as_tensor(radius, dtype=u.dtype, device=u.device)
    with torch.no_grad():  # the support S only; τ is recomputed below with autograd
        ud, sd = u.detach(), s.detach()
        srt = torch.sort(ud, dim=-1, descending=True).values
        k = torch.arange(1, u.shape[-1] + 1, dtype=u.dtype, device=u.device)
        css = srt.cumsum(-1) - sd.unsqueeze(-1) if sd.ndim else srt.cumsum(-1) - sd
        rho = (srt - css / k > 0).sum(-1, keepdim=True).clamp(min=1)
        tau0 = css.gather(-1, rho - 1) / rho.to(u.dtype)
        support = (ud > tau0) | (ud == ud.max(-1, keepdim=True).values) | ud.isnan()
    m = support.to(u.dtype)
    sv = s.unsqueeze(-1) if s.ndim else s
    tau = ((u * m).sum(-1, keepdim=True) - sv) / m.sum(-1, keepdim=True)
    return torch.where(support, u - tau, torch.zeros_like(u))


@dataclass(frozen=True)
class ProximalGradient:
    """``Φ(w, λ) = prox(w − η ∇_w g(w, λ), λ, η)``: one proximal-gradient step, a fixed-point map.

    ``smooth_loss(params, hparams)`` is the smooth part ``g`` (a scalar), differentiated
    with ``torch.func.grad``; or give its gradient ``smooth_grad(params, hparams)`` (a pytree
    like ``params``) instead when you have it in closed form — on small problems it saves
    the transform's overhead on every call.  ``prox(u, hparams, step)`` returns
    ``prox_{step·r_λ}(u)`` for the nonsmooth part ``r_λ`` (``u`` shaped like ``params``),
    e.g. ``lambda u, lam, eta: bilevel.prox.soft_threshold(u, eta * lam.exp())``.
    Its fixed point minimises ``g + r_λ``.  Call it as ``Φ(params, hparams)``.

    Its Jacobian ``∂_wΦ = ∂prox·(I − η∇²g)`` is *not* symmetric in general: with
    :func:`bilevel.hypergrad` use ``FixedPoint``, ``GMRES``, ``NormalCG`` or ``Dense``.
    """

    smooth_loss: Callable[[Any, Any], torch.Tensor] | None
    prox: Callable[[Any, Any, float], Any]
    step: float
    smooth_grad: Callable[[Any, Any], Any] | None = None

    def __post_init__(self) -> None:
        if (self.smooth_loss is None) == (self.smooth_grad is None):
            raise ValueError("proximal_gradient: pass exactly one of smooth_loss and smooth_grad=.")
        if not callable(self.smooth_loss or self.smooth_grad) or not callable(self.prox):
            raise TypeError("proximal_gradient: smooth_loss (or smooth_grad) and prox should be callables.")
        if isinstance(self.step, bool) or not isinstance(self.step, (int, float)) or not (
            math.isfinite(self.step) and self.step > 0
        ):
            raise ValueError(
                f"proximal_gradient: step should be a finite float > 0 (below 2/L, L the "
                f"Lipschitz constant of ∇_w smooth_loss), not {self.step!r}."
            )

    def gradient(self, params: Any, hparams: Any) -> Any:
        """``∇_w g(params, hparams)``, shaped like ``params``."""
        if self.smooth_grad is not None:
            return self.smooth_grad(params, hparams)
        loss = self.smooth_loss
        return grad(lambda p: scalar(loss(p, hparams), "smooth_loss"))(params)  # type: ignore[misc]

    def __call__(self, params: Any, hparams: Any) -> Any:
        g = self.gradient(params, hparams)
        u = T.tree_map(lambda w, gw: w - self.step * gw, params, g)
        return self.prox(u, hparams, self.step)

    def contraction(self, params: Any, hparams: Any, *, iters: int = 50) -> float:
        """Estimate ``max |1 − η·eig(∇²_w g)|`` at ``params``: the factor by which Φ contracts.

        Power iteration on Hessian–vector products (forward over reverse), ``2·iters`` of
        them; an estimate from inside the spectrum, so a value ``> 1`` proves that the
        step ``η`` breaks the contraction (``η ≥ 2/L``, or ``g`` is not convex there).
        """
        lo, hi = _hessian_spectrum(self.gradient, params, hparams, iters=iters)
        return max(abs(1 - self.step * lo), abs(1 - self.step * hi))


def proximal_gradient(
    smooth_loss: Callable[[Any, Any], torch.Tensor] | None,
    prox: Callable[[Any, Any, float], Any],
    step: float,
    *,
    smooth_grad: Callable[[Any, Any], Any] | None = None,
) -> ProximalGradient:
    """The proximal-gradient fixed-point map ``Φ(w, λ) = prox_{η r_λ}(w − η∇_w g(w, λ))``.

    See :class:`ProximalGradient`.  ``step`` is η; Φ is a contraction for a
    μ-strongly convex, L-smooth ``g`` and ``0 < η < 2/L`` (``η = 1/L`` is the usual choice).
    Pass ``smooth_loss=None, smooth_grad=...`` to give ``∇_w g`` in closed form.
    """
    return ProximalGradient(smooth_loss, prox, step, smooth_grad)


def _hessian_spectrum(
    gradient: Callable[[Any, Any], Any], params: Any, hparams: Any, *, iters: int = 50
) -> tuple[float, float]:
    """Estimates ``(lowest, highest)`` eigenvalue of the (symmetric) Jacobian of ``gradient``.

    Power iteration for the eigenvalue of largest magnitude ``e₁``, then on ``H − e₁I`` for
    the other end of the spectrum; both are Rayleigh quotients, so they lie inside it.
    """
    w, spec = T.tree_flatten(params)
    w = [t.detach() for t in w]
    lam = T.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, hparams)

    def grad_g(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        return T.tree_flatten(gradient(T.tree_unflatten(list(leaves), spec), lam))[0]

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(jvp(grad_g, (w,), (v,))[1])

    e1 = _power(hvp, w, iters)
    e2 = e1 + _power(lambda v: T.axpy(-e1, v, hvp(v)), w, iters)
    return min(e1, e2), max(e1, e2)


def _power(matvec: Callable[[list[torch.Tensor]], list[torch.Tensor]], like: list[torch.Tensor], iters: int) -> float:
    gen = torch.Generator(device=like[0].device).manual_seed(0)
    x = [torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in like]
    x = T.scale(1 / T.norm(x), x)
    rq = torch.zeros((), dtype=like[0].dtype)
    for _ in range(max(1, iters)):
        y = matvec(x)
        rq = T.vdot(x, y)
        ny = T.norm(y)
        if not bool(ny > 0):
            break
        x = T.scale(1 / ny, y)
    return float(rq)

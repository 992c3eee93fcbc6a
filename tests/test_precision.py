"""Mixed precision: losses under torch.autocast (bf16/fp16) while the solver's vectors stay
float32; the hypergradient is within the autocast error of the exact one, and a tolerance
bf16 cannot reach warns instead of passing silently."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import bilevel

N, D = 300, 20


def _problem(amp):
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)
    wt = torch.randn(D, generator=g, dtype=torch.float64)
    y, yv = (X @ wt > 0).double(), (Xv @ wt > 0).double()
    lam = torch.linspace(-2, 0, D, dtype=torch.float64)

    def losses(dt, amp):
        cast = (lambda: torch.autocast("cpu", dtype=amp)) if amp is not None else contextlib.nullcontext
        Xm, ym, Xvm, yvm = X.to(dt), y.to(dt), Xv.to(dt), yv.to(dt)

        def inner(w, lam):
            with cast():
                z = Xm @ w
            return F.binary_cross_entropy_with_logits(z.to(dt), ym) + 0.5 * (lam.exp() * w * w).sum()

        def outer(w, lam):
            with cast():
                z = Xvm @ w
            return F.binary_cross_entropy_with_logits(z.to(dt), yvm)

        return inner, outer

    inner64, outer64 = losses(torch.float64, None)
    w = torch.zeros(D, dtype=torch.float64)
    for _ in range(25):
        w = w - torch.linalg.solve(torch.func.hessian(inner64)(w, lam), torch.func.grad(inner64)(w, lam))
    H = torch.func.hessian(inner64)(w, lam)
    exact = -lam.exp() * w * torch.linalg.solve(H, torch.func.grad(outer64)(w, lam))
    inner, outer = losses(torch.float32, amp)
    return inner, outer, w.float(), lam.float(), exact


@pytest.mark.parametrize("amp, bound", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2), (None, 1e-5)])
def test_autocast_hypergradient_is_within_its_precision(amp, bound):
    inner, outer, w, lam, exact = _problem(amp)
    tol = 1e-2 if amp is not None else 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reachable tolerance: no warning
        hg, info = bilevel.hypergrad(outer, w, lam, inner_loss=inner, solver=bilevel.CG(maxiter=200, tol=tol),
                                     return_info=True)
    assert hg.dtype == torch.float32 and info.v.dtype == torch.float32  # the solver accumulates in float32
    err = float((hg.double() - exact).norm() / exact.norm())
    assert err < bound, err
    if amp is not None:  # and the autocast error is really there: bf16/fp16 differ from float32
        inner32, outer32, *_ = _problem(None)
        hg32 = bilevel.hypergrad(outer32, w, lam, inner_loss=inner32, solver=bilevel.CG(maxiter=200, tol=1e-6))
        assert (hg - hg32).norm() > 1e-5 * hg32.norm()


def test_bf16_with_a_float32_tolerance_warns():
    inner, outer, w, lam, _ = _problem(torch.bfloat16)
    with pytest.warns(bilevel.ConvergenceWarning):
        bilevel.hypergrad(outer, w, lam, inner_loss=inner, solver=bilevel.CG(maxiter=100, tol=1e-7))

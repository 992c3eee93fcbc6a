"""GPU paths: run where CUDA exists, skipped elsewhere (the CI machines have no GPU).

Results on CUDA equal the CPU's to rounding, and the Krylov loops do not synchronise with
the host every iteration (convergence and failure flags are read every few iterations)."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def _problem(device, n=400, d=50, dtype=torch.float64, amp=None):
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    y, yv = torch.randn(n, generator=g), torch.randn(n, generator=g)
    X, Xv, y, yv = (t.to(device, dtype) for t in (X, Xv, y, yv))
    lam = torch.linspace(-2, 0, d, dtype=dtype, device=device)

    def residual(A, w, b):
        if amp is None:
            return A @ w - b
        with torch.autocast("cuda", dtype=amp):
            Aw = A @ w
        return Aw.to(dtype) - b

    def inner(w, lam):
        return 0.5 * (residual(X, w, y) ** 2).mean() + 0.5 * (lam.exp() * w * w).sum()

    def outer(w, lam):
        return 0.5 * (residual(Xv, w, yv) ** 2).mean()

    A = X.T @ X / n + torch.diag(lam.exp())
    w = torch.linalg.solve(A, X.T @ y / n)
    return inner, outer, w, lam


@pytest.mark.parametrize("solver", [bilevel.CG(tol=1e-10), bilevel.MINRES(tol=1e-10), bilevel.GMRES(tol=1e-10)])
def test_cuda_matches_cpu(solver):
    inner, outer, w, lam = _problem("cuda")
    got = bilevel.hypergrad(outer, w, lam, inner_loss=inner, solver=solver)
    inner, outer, w, lam = _problem("cpu")
    ref = bilevel.hypergrad(outer, w, lam, inner_loss=inner, solver=solver)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("solver", [bilevel.CG(maxiter=64, tol=0), bilevel.MINRES(maxiter=64, tol=0)])
def test_krylov_loop_does_not_sync_every_iteration(solver):
    inner, outer, w, lam = _problem("cuda")
    bilevel.hypergrad(outer, w, lam, inner_loss=inner, solver=solver)  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            bilevel.hypergrad(outer, w, lam, inner_loss=inner, solver=solver)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(c.message) for c in caught)
    assert syncs < 64 // 2, f"{syncs} host syncs in 64 iterations"


def test_autocast_bf16_on_cuda():
    inner, outer, w, lam = _problem("cuda")
    ref = bilevel.hypergrad(outer, w, lam, inner_loss=inner, solver=bilevel.CG(tol=1e-10))
    inner32, outer32, w32, lam32 = _problem("cuda", dtype=torch.float32, amp=torch.bfloat16)
    got = bilevel.hypergrad(outer32, w32, lam32, inner_loss=inner32, solver=bilevel.CG(tol=1e-2))
    assert got.dtype == torch.float32
    assert float((got.double() - ref).norm() / ref.norm()) < 3e-2

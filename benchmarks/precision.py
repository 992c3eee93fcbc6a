"""Hypergradient accuracy in mixed precision: losses under ``torch.autocast`` (bf16, fp16) vs
float32 vs float64, against the exact float64 hypergradient.

How mixed precision works with :func:`bilevel.hypergrad`: the user's losses run their
matmuls under ``torch.autocast`` (inside ``inner_loss``/``outer_loss``, as in a training
step), while ``params``, ``hparams`` and so the solver's vectors stay float32: every CG
inner product, residual and update accumulates in float32; only the Hessian–vector
products inherit the autocast error (~1e-2 relative per product for bf16).  That error
floors the linear solve's residual, so ask for a tolerance it can reach (``CG(tol=1e-2)``
in bf16) — a tighter one warns that it was missed, as it should.

Two problems, both with an exact answer (a dense float64 Hessian solve at an inner
solution found to machine precision in float64):

* ``logistic``: per-feature-L2 logistic regression, n = 2000, d = 200 (``inner``: Newton);
* ``mlp``: a 2-layer tanh MLP (20-32-1 regression, 705 parameters), L2 per layer, inner
  solved by Newton on the dense Hessian from a converged L-BFGS start (a strict local minimum).

Each row: relative error ‖ĝ − ∇F‖/‖∇F‖ of the hypergradient when the losses (and the
inner solution, rounded to that dtype) are evaluated in each precision; CG to tol 1e-2
(bf16/fp16), 1e-6 (float32), 1e-12 (float64).

    python benchmarks/precision.py            # table + benchmarks/results/precision.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import configure_threads, format_table, machine_info, write_json  # noqa: E402

import bilevel  # noqa: E402

MODES = {  # name -> (dtype of params/hparams, autocast dtype or None, CG tol)
    "float64": (torch.float64, None, 1e-12),
    "float32": (torch.float32, None, 1e-6),
    "bf16 autocast": (torch.float32, torch.bfloat16, 1e-2),
    "fp16 autocast": (torch.float32, torch.float16, 1e-2),
}


def _cast(mode: str) -> Any:
    amp = MODES[mode][1]
    return contextlib.nullcontext() if amp is None else torch.autocast("cpu", dtype=amp)


def logistic(seed: int = 0, n: int = 2000, d: int = 200) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    wt = torch.randn(d, generator=g, dtype=torch.float64)
    y = (X @ wt + torch.randn(n, generator=g, dtype=torch.float64) > 0).double()
    yv = (Xv @ wt > 0).double()
    lam = torch.linspace(-3, 0, d, dtype=torch.float64)

    def make(mode: str) -> tuple[Callable, Callable]:
        dt = MODES[mode][0]
        Xm, ym, Xvm, yvm = X.to(dt), y.to(dt), Xv.to(dt), yv.to(dt)

        def inner(w, lam):
            with _cast(mode):
                z = Xm @ w
            return F.binary_cross_entropy_with_logits(z.to(dt), ym) + 0.5 * (lam.exp() * w * w).sum()

        def outer(w, lam):
            with _cast(mode):
                z = Xvm @ w
            return F.binary_cross_entropy_with_logits(z.to(dt), yvm)

        return inner, outer

    inner64, outer64 = make("float64")
    w = torch.zeros(d, dtype=torch.float64)
    for _ in range(30):  # Newton to machine precision
        gr = torch.func.grad(inner64)(w, lam)
        w = w - torch.linalg.solve(torch.func.hessian(inner64)(w, lam), gr)
    return {"make": make, "w": w, "lam": lam, "exact": _exact(inner64, outer64, w, lam)}


def mlp(seed: int = 0, n: int = 256, d: int = 20, h: int = 32) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    teacher = torch.randn(d, generator=g, dtype=torch.float64) / d**0.5
    y, yv = torch.sin(X @ teacher), torch.sin(Xv @ teacher)
    shapes = [(d, h), (h,), (h, 1), (1,)]
    sizes = [int(torch.tensor(s).prod()) for s in shapes]
    lam = torch.tensor([-3.0, -5.0, -3.0, -5.0], dtype=torch.float64)

    def unflat(w):
        return [t.reshape(s) for t, s in zip(torch.split(w, sizes), shapes)]

    def make(mode: str) -> tuple[Callable, Callable]:
        dt = MODES[mode][0]
        Xm, ym, Xvm, yvm = X.to(dt), y.to(dt), Xv.to(dt), yv.to(dt)

        def net(w, A):
            W1, b1, W2, b2 = unflat(w)
            with _cast(mode):
                out = torch.tanh(A @ W1 + b1) @ W2
            return out.to(dt).squeeze(-1) + b2

        def inner(w, lam):
            reg = sum(lg.exp() * (t * t).sum() for lg, t in zip(lam, unflat(w)))
            return 0.5 * ((net(w, Xm) - ym) ** 2).mean() + 0.5 * reg

        def outer(w, lam):
            return 0.5 * ((net(w, Xvm) - yvm) ** 2).mean()

        return inner, outer

    inner64, outer64 = make("float64")
    w0 = torch.randn(sum(sizes), generator=g, dtype=torch.float64) * 0.3
    w, _ = bilevel.lbfgs(inner64, w0, lam, maxiter=2000, tol=1e-9)
    for _ in range(10):  # polish by Newton: a strict local minimum to machine precision
        H = torch.func.hessian(inner64)(w, lam)
        w = w - torch.linalg.solve(H, torch.func.grad(inner64)(w, lam))
    if torch.linalg.eigvalsh(torch.func.hessian(inner64)(w, lam)).min() <= 0:
        raise RuntimeError("the MLP inner solution is not a strict local minimum; change the seed")
    return {"make": make, "w": w, "lam": lam, "exact": _exact(inner64, outer64, w, lam)}


def _exact(inner: Callable, outer: Callable, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    H = torch.func.hessian(inner)(w, lam)
    v = torch.linalg.solve(H, torch.func.grad(outer)(w, lam))
    mixed = torch.func.jacrev(torch.func.grad(inner), argnums=1)(w, lam)  # ∂_λ∇_w g: (d_w, d_λ)
    return torch.func.grad(outer, argnums=1)(w, lam) - mixed.T @ v


def run(problem: dict[str, Any], name: str) -> list[dict[str, Any]]:
    rows = []
    for mode, (dt, _, tol) in MODES.items():
        inner, outer = problem["make"](mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hg, info = bilevel.hypergrad(outer, problem["w"].to(dt), problem["lam"].to(dt), inner_loss=inner,
                                         solver=bilevel.CG(maxiter=500, tol=tol), return_info=True,
                                         inner_tol=float("inf"))
        ex = problem["exact"]
        rows.append({"problem": name, "mode": mode, "rel_err": float((hg.double() - ex).norm() / ex.norm()),
                     "cg_iterations": int(info.iterations), "residual": float(info.residual),
                     "result_dtype": str(hg.dtype).replace("torch.", ""),
                     "warned": [str(w.message).split(".")[0] for w in caught]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/precision.json")
    args = p.parse_args(argv)
    threads = configure_threads(args.threads)
    rows = run(logistic(), "logistic n=2000 d=200") + run(mlp(), "MLP 20-32-1 (705 params)")
    print(format_table(["problem", "losses in", "rel err vs exact", "CG its", "CG residual", "result dtype"],
                       [[r["problem"], r["mode"], r["rel_err"], r["cg_iterations"], r["residual"],
                         r["result_dtype"]] for r in rows]))
    print(f"wrote {write_json(args.out, {'benchmark': 'precision', 'machine': machine_info(threads), 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

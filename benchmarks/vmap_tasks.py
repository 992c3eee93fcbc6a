"""Many small bilevel tasks at once: torch.func.vmap vs a Python loop over the tasks.

Meta-learning-like: B independent tasks (default 256), each with its own data and its own
per-feature penalties λ ∈ R^d, and the hypergradient ∇F(λ) of each::

    ridge     g(w, λ) = ½ mean (Xw − y)² + ½ Σ_j e^{λ_j} w_j²,  f(w) = ½ mean (X_v w − y_v)²
    logistic  g(w, λ) = mean log(1 + e^{−y·Xw}) + ½ Σ_j e^{λ_j} w_j²,  f = validation loss

Inner solve: ridge by its normal equations, logistic by a fixed number of Newton steps
(closed-form gradient and Hessian; no data-dependent stopping, so it vmaps).  Four ways
to get all B hypergradients, the same work in each (CG with exactly K iterations, tol=0):

* ``hypergrad loop``  / ``hypergrad vmap``: inner solve, then :func:`bilevel.hypergrad`;
* ``implicit loop``   / ``implicit vmap``: the inner solver decorated with
  :func:`bilevel.implicit`, differentiated by ``torch.func.grad``.

Each time is the median of ``--repeats`` calls (warm-up excluded), wall and process CPU
time (on a shared machine the CPU time is the steadier measure); every result is
compared with the loop (they should agree to rounding) and with the exact hypergradients
(ridge: autograd through the dense normal equations; logistic: Newton to machine
precision and a dense Hessian solve, float64).

    python benchmarks/vmap_tasks.py                       # 256 tasks, float64 and float32
    python benchmarks/vmap_tasks.py --quick               # 16 tasks, 2 repeats
    python benchmarks/vmap_tasks.py --tasks 1024 --dtypes float64 --threads 1 --out r.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import configure_threads, format_table, machine_info, time_call, write_json  # noqa: E402

import bilevel  # noqa: E402

NEWTON_STEPS = 12


@dataclass(frozen=True)
class Tasks:
    """B tasks stacked on dim 0: λ (B, d), X (B, n, d), y (B, n), X_v, y_v."""

    lam: torch.Tensor
    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor

    def astuple(self) -> tuple[torch.Tensor, ...]:
        return (self.lam, self.X, self.y, self.Xv, self.yv)

    def to(self, dtype: torch.dtype) -> Tasks:
        return Tasks(*(t.to(dtype) for t in self.astuple()))


def make_tasks(family: str, tasks: int, n: int, d: int, seed: int = 0) -> Tasks:
    """Gaussian features; a random linear model per task; e^λ log-uniform in [1e-2, 1]."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    X, Xv = torch.randn(tasks, n, d, generator=g, dtype=f64), torch.randn(tasks, n, d, generator=g, dtype=f64)
    w_true = torch.randn(tasks, d, generator=g, dtype=f64) / d**0.5
    y = torch.einsum("bnd,bd->bn", X, w_true) + 0.5 * torch.randn(tasks, n, generator=g, dtype=f64)
    yv = torch.einsum("bnd,bd->bn", Xv, w_true) + 0.5 * torch.randn(tasks, n, generator=g, dtype=f64)
    if family == "logistic":
        y, yv = torch.where(y >= 0, 1.0, -1.0).to(f64), torch.where(yv >= 0, 1.0, -1.0).to(f64)
    lam = torch.empty(tasks, d, dtype=f64).uniform_(-4.6, 0.0, generator=g)
    return Tasks(lam, X, y, Xv, yv)


# --------------------------------------------------------------------------- the problems


def ridge_inner(w, lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()


def ridge_outer(w, lam, Xv, yv):
    return 0.5 * ((Xv @ w - yv) ** 2).mean()


def ridge_solve(w0, lam, X, y):
    n = X.shape[0]
    return torch.linalg.solve(X.T @ X / n + torch.diag(lam.exp()), X.T @ y / n)


def logistic_inner(w, lam, X, y):
    return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * (lam.exp() * w**2).sum()


def logistic_outer(w, lam, Xv, yv):
    return torch.nn.functional.softplus(-yv * (Xv @ w)).mean()


def logistic_solve(w, lam, X, y, steps=NEWTON_STEPS):
    """Newton with the closed-form gradient and Hessian, a fixed number of steps."""
    n = X.shape[0]
    for _ in range(steps):
        s = torch.sigmoid(-y * (X @ w))
        grad = -X.T @ (y * s) / n + lam.exp() * w
        hess = X.T @ ((s * (1 - s))[:, None] * X) / n + torch.diag(lam.exp())
        w = w - torch.linalg.solve(hess, grad)
    return w


PROBLEMS = {
    "ridge": (ridge_inner, ridge_outer, ridge_solve),
    "logistic": (logistic_inner, logistic_outer, logistic_solve),
}


def methods(family: str, d: int, K: int) -> dict[str, Callable[[Tasks], torch.Tensor]]:
    """Each maps stacked tasks to the (B, d) stacked hypergradients."""
    inner, outer, solve = PROBLEMS[family]
    solver = bilevel.CG(maxiter=K, tol=0.0)  # exactly K iterations, in the loop and under vmap
    decorated = bilevel.implicit(inner_loss=inner, solver=solver)(solve)

    def by_hypergrad(lam, X, y, Xv, yv):
        w = solve(torch.zeros_like(lam), lam, X, y)
        return bilevel.hypergrad(lambda w, lam: outer(w, lam, Xv, yv), w, lam,
                                 inner_loss=lambda w, lam: inner(w, lam, X, y), solver=solver)

    def by_implicit(lam, X, y, Xv, yv):
        return torch.func.grad(lambda lam: outer(decorated(torch.zeros_like(lam), lam, X, y), lam, Xv, yv))(lam)

    def loop(fn):
        return lambda t: torch.stack([fn(*task) for task in zip(*t.astuple(), strict=True)])

    def batched(fn):
        vfn = torch.func.vmap(fn)
        return lambda t: vfn(*t.astuple())

    return {
        "hypergrad loop": loop(by_hypergrad),
        "hypergrad vmap": batched(by_hypergrad),
        "implicit loop": loop(by_implicit),
        "implicit vmap": batched(by_implicit),
    }


def exact_hypergrads(family: str, t: Tasks) -> torch.Tensor:
    """float64 reference: autograd through the dense inner solution (ridge: its closed form;
    logistic: Newton to machine precision, then ∇F = −e^λ ⊙ w ⊙ H⁻¹∇_w f)."""
    t = t.to(torch.float64)
    inner, outer, solve = PROBLEMS[family]
    if family == "ridge":
        def one(lam, X, y, Xv, yv):
            return torch.func.grad(lambda lam: outer(solve(None, lam, X, y), lam, Xv, yv))(lam)
    else:
        def one(lam, X, y, Xv, yv):
            w = logistic_solve(torch.zeros_like(lam), lam, X, y, steps=40)
            H = torch.func.hessian(inner)(w, lam, X, y)
            return -lam.exp() * w * torch.linalg.solve(H, torch.func.grad(outer)(w, lam, Xv, yv))
    return torch.func.vmap(one)(*t.astuple())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-task relative error ‖a_i − b_i‖ / ‖b_i‖."""
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


# --------------------------------------------------------------------------- the run


def run_family(family: str, dtype: torch.dtype, args: argparse.Namespace) -> list[dict[str, Any]]:
    base = make_tasks(family, args.tasks, args.n, args.d, seed=args.seed)
    t = base.to(dtype)
    exact = exact_hypergrads(family, base)
    rows, outs = [], {}
    for name, fn in methods(family, args.d, args.K).items():
        cpu: list[float] = []

        def call(_: Any, fn: Callable[[Tasks], torch.Tensor] = fn, cpu: list[float] = cpu) -> torch.Tensor:
            c0 = time.process_time()
            out = fn(t)
            cpu.append(time.process_time() - c0)
            return out

        timing, out = time_call(call, repeats=args.repeats)
        outs[name] = out
        # CPU time of the process next to the wall time: on a shared machine the wall time
        # also counts the time other processes held the cores
        cpu_ms = 1e3 * statistics.median(cpu[1:])
        rows.append({"family": family, "dtype": str(dtype).replace("torch.", ""), "method": name,
                     **timing.as_dict(), "per_task_us": 1e6 * timing.median / args.tasks,
                     "cpu_median_ms": cpu_ms, "rel_err_exact": rel_err(out, exact)})
    for row in rows:
        kind = row["method"].split()[0]
        loop_row = next(r for r in rows if r["method"] == f"{kind} loop")
        row["rel_err_vs_loop"] = rel_err(outs[row["method"]], outs[f"{kind} loop"])
        row["speedup_vs_loop"] = loop_row["median_ms"] / row["median_ms"]
        row["cpu_speedup_vs_loop"] = loop_row["cpu_median_ms"] / row["cpu_median_ms"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["family", "dtype", "method", "wall ms", "µs/task", "speedup", "cpu ms", "cpu speedup",
               "err vs loop", "err vs exact"]
    body = [[r["family"], r["dtype"], r["method"], r["median_ms"], r["per_task_us"],
             f"{r['speedup_vs_loop']:.1f}x", r["cpu_median_ms"], f"{r['cpu_speedup_vs_loop']:.1f}x",
             r["rel_err_vs_loop"], r["rel_err_exact"]] for r in rows]
    return format_table(headers, body)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=256, help="number of tasks B (default 256)")
    p.add_argument("--n", type=int, default=40, help="training (and validation) points per task")
    p.add_argument("--d", type=int, default=10, help="features (= hyperparameters) per task")
    p.add_argument("--K", type=int, default=None, help="CG iterations (default d: exact for ridge)")
    p.add_argument("--families", default="ridge,logistic")
    p.add_argument("--dtypes", default="float64,float32")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="16 tasks, 2 repeats: a smoke run")
    p.add_argument("--out", default="benchmarks/results/vmap_tasks.json", help="JSON output path")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.repeats = 16, 2
    args.K = args.d if args.K is None else args.K
    for name in ("tasks", "n", "d", "K", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} should be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = configure_threads(args.threads)
    rows = []
    for dtype in args.dtypes.split(","):
        for family in args.families.split(","):
            if family not in PROBLEMS:
                raise SystemExit(f"--families: {family!r} is not one of {sorted(PROBLEMS)}")
            rows += run_family(family, getattr(torch, dtype), args)
    print(f"{args.tasks} tasks, n={args.n}, d={args.d}, CG K={args.K} (tol=0), "
          f"{threads['threads']} thread(s); median of {args.repeats}")
    print(table(rows))
    payload = {"benchmark": "vmap_tasks", "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "machine": machine_info(threads), "results": rows}
    print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Automatic budgets vs the cheapest fixed (T, K): what ``bilevel.hypergrad_within(tol=ε)`` pays.

On random instances with exact hypergradients (tests/error_instances.py: ridge, logistic,
a non-symmetric linear contraction, Lasso through a proximal-gradient map; κ = 2 … 1e3),
for ε = 1e-3·‖∇F‖ and 1e-6·‖∇F‖:

* ``auto``: :func:`bilevel.hypergrad_within` from the cold start ``w0``: its inner steps T,
  linear-solver iterations K (all rounds) and the products its error estimates cost P;
  cost = T + K + P (one unit = one inner step or one product with the IFT matrix).
* ``oracle``: the cheapest fixed grid point (T from a fine geometric grid, ratio 1.1;
  K = 1 … 2d) whose *true* error is ≤ ε — a budget that can only be found knowing the
  answer; cost = T + K.

Reported: the cost ratio auto/oracle, whether auto's true error is ≤ ε, and wall times.

    python benchmarks/error_budget.py        # table + benchmarks/results/error_budget.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import configure_threads, format_table, machine_info, write_json  # noqa: E402
from error_instances import FAMILIES  # noqa: E402

import bilevel  # noqa: E402


def _solver(inst, K=None):
    if inst.inner_loss is not None:
        return bilevel.CG() if K is None else bilevel.CG(maxiter=K, tol=0.0)
    return bilevel.GMRES() if K is None else bilevel.GMRES(maxiter=K, tol=0.0)


def _grid(limit: int) -> list[int]:
    ts, t = [0], 1.0
    while t <= limit:
        if int(t) != ts[-1]:
            ts.append(int(t))
        t *= 1.1
    return ts


def oracle(inst, eps: float, t_limit: int) -> tuple[int, int] | None:
    """Cheapest (T, K) on the grid with true error ≤ eps (T + K minimal)."""
    d = inst.w_star.numel()
    best, w, t_done = None, inst.w0.clone(), 0
    for T in _grid(t_limit):
        with torch.no_grad():
            for _ in range(T - t_done):
                w = inst.step(w, inst.hparams)
        t_done = T
        if best is not None and T >= best[0] + best[1]:
            break
        for K in range(1, 2 * d + 1):
            if best is not None and T + K >= best[0] + best[1]:
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hg = bilevel.hypergrad(inst.outer_loss, w, inst.hparams, solver=_solver(inst, K), inner_tol=math.inf,
                                       **inst.form)
            if (hg - inst.exact).norm().item() <= eps:
                best = (T, K)
                break
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "error_budget.json"))
    args = parser.parse_args(argv)
    threads = configure_threads(args.threads)
    rows, records = [], []
    for fam in ("ridge", "logistic", "linear_fp", "lasso"):
        for seed in range(args.seeds):
            for kappa in (2.0, 10.0, 100.0, 1e3):
                inst = FAMILIES[fam](seed * 7 + int(round(3 * math.log10(kappa))), kappa)
                for rel in (1e-3, 1e-6):
                    eps = rel * inst.exact.norm().item()
                    t0 = time.perf_counter()
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", bilevel.ConvergenceWarning)
                        hg, _, info = bilevel.hypergrad_within(inst.outer_loss, inst.w0, inst.hparams, tol=eps,
                                                               inner_step=inst.step, solver=_solver(inst),
                                                               max_inner=40_000, **inst.form)
                    t_auto = time.perf_counter() - t0
                    true = (hg - inst.exact).norm().item()
                    auto = info.inner_iterations + info.iterations + info.error.products
                    t0 = time.perf_counter()
                    best = oracle(inst, eps, max(4 * info.inner_iterations, 100))
                    t_oracle = time.perf_counter() - t0
                    cost_o = None if best is None else best[0] + best[1]
                    ratio = None if cost_o is None else auto / cost_o
                    rec = {"family": fam, "kappa": inst.kappa, "seed": seed, "eps_relative": rel, "eps": eps,
                           "auto_T": info.inner_iterations, "auto_K": info.iterations,
                           "auto_estimate_products": info.error.products, "auto_cost": auto,
                           "auto_true_error": true, "auto_met_eps": true <= eps, "auto_warned": len(caught) > 0,
                           "oracle_T": None if best is None else best[0], "oracle_K": None if best is None else best[1],
                           "oracle_cost": cost_o, "cost_ratio": ratio, "auto_seconds": t_auto,
                           "oracle_search_seconds": t_oracle}
                    records.append(rec)
                    rows.append([fam, f"{inst.kappa:.3g}", f"{rel:.0e}", f"{info.inner_iterations}",
                                 f"{info.iterations}", f"{info.error.products}",
                                 "-" if best is None else f"{best[0]}", "-" if best is None else f"{best[1]}",
                                 "-" if ratio is None else f"{ratio:.2f}", f"{true / eps:.2f}"])
    print(format_table(["family", "kappa", "eps/|∇F|", "auto T", "auto K", "auto P", "oracle T", "oracle K",
                        "cost ratio", "true/eps"], rows))
    ratios = [r["cost_ratio"] for r in records if r["cost_ratio"] is not None]
    summary = {
        "instances": len(records),
        "met_eps": sum(r["auto_met_eps"] for r in records) / len(records),
        "median_cost_ratio": statistics.median(ratios),
        "cost_ratio_le_2": sum(x <= 2 for x in ratios) / len(ratios),
        "median_cost_ratio_without_estimates": statistics.median(
            (r["auto_T"] + r["auto_K"]) / r["oracle_cost"] for r in records if r["oracle_cost"]),
    }
    for key in ("ridge", "logistic", "linear_fp", "lasso"):
        rs = [r["cost_ratio"] for r in records if r["family"] == key and r["cost_ratio"] is not None]
        summary[f"median_cost_ratio_{key}"] = statistics.median(rs)
    print("\n" + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    path = write_json(args.out, {"benchmark": "error_budget", "machine": machine_info(threads), "summary": summary,
                                 "records": records})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Iteration complexity of hypergradient methods, with the error each method reports.

Reproduces the comparison of Grazzi, Franceschi, Pontil, Salzo, "On the Iteration
Complexity of Hypergradient Computation" (ICML 2020) on three problems whose exact
hypergradient is known (inner problem solved to machine precision by Newton's method, then
a dense float64 solve):

* ``logreg``: per-feature-L2 logistic regression on synthetic data,
  ``g(w, λ) = mean log(1 + e^{−y xᵀw}) + ½ Σ_j e^{λ_j} w_j²``, ``f`` the same loss on
  validation data;
* ``logreg-cancer``: the same model on scikit-learn's bundled breast-cancer data
  (569 × 30, standardised, half for training, half for validation);
* ``kernel-ridge``: kernel ridge regression in the dual, ``g(w, λ) = ½ wᵀ(K + e^{λ₀} I)w − wᵀy``
  with the RBF kernel ``K_ij = exp(−e^{λ₁}‖x_i − x_j‖²)`` (λ = log ridge, log width),
  ``f = ½‖K_val w − y_val‖²/n_val``.

The inner iteration is gradient descent ``Φ(w, λ) = w − η∇_w g`` (``η = 1/L`` at ``w*``, a
contraction with ``q = 1 − μ/L``).  For t = 1, 2, 4, … inner steps from ``w = 0`` and as
many linear-system steps (K = t), four hypergradients: ITD (reverse mode through the t
steps, :func:`bilevel.unroll`), AID-FP (``FixedPoint``), AID-Neumann (``Neumann``) and AID-CG
(``CG`` on the optimality form), each against the exact ``∇F``.  The plot draws beside
each true error the a-posteriori estimate: ``info.error_estimate`` for AID, and
:func:`bilevel.hypergrad_error` for ITD (its distance to AID-CG at ``w_t`` + that one's); the
fitted linear rates (``error ∝ r^t``) are printed next to ``q̂ = info.contraction``.  Then the
total cost (inner steps + linear iterations, + the estimates' own products) of reaching
ε = 1e-3 and 1e-6 (relative to ‖∇F‖) with :func:`bilevel.hypergrad_within` (automatic
budgets) vs the cheapest point of a fixed (T, K) grid that reaches it.

    bilevel run iteration-complexity [--out runs/iteration-complexity] [--quick] [--resume]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import bilevel
from bilevel.apps import _runs

DTYPE = torch.float64
METHODS = ("ITD", "AID-FP", "AID-Neumann", "AID-CG")
PROBLEMS = ("logreg", "logreg-cancer", "kernel-ridge")


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``."""

    max_log2_t: int = 10  # t = 1, 2, 4, ..., 2^max_log2_t
    n: int = 200  # synthetic logistic regression: samples (train and validation each)
    d: int = 20  # and features
    n_kernel: int = 80  # kernel ridge: training points (as many for validation)
    reg: float = 1e-2  # logistic regression: per-feature penalties e^λ drawn around reg
    seed: int = 0


QUICK = {"max_log2_t": 4, "n": 60, "d": 6, "n_kernel": 20}
CHECKPOINT_KEYS = ("step", "problems")
EPSILONS = (1e-3, 1e-6)


@dataclass
class Problem:
    name: str
    inner_loss: Any
    outer_loss: Any
    hparams: torch.Tensor
    w0: torch.Tensor
    w_star: torch.Tensor
    exact: torch.Tensor
    eta: float
    q: float  # 1 − μ/L at w*

    def step(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return w - self.eta * torch.func.grad(self.inner_loss)(w, lam)


def _newton(inner_loss: Any, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    for _ in range(100):
        gr = torch.func.grad(inner_loss)(w, lam)
        if gr.norm() < 1e-14:
            break
        w = w - torch.linalg.solve(torch.func.hessian(inner_loss)(w, lam), gr)
    return w


def _finish(name: str, inner_loss: Any, outer_loss: Any, lam: torch.Tensor, dim: int) -> Problem:
    """Inner solution by Newton, exact hypergradient by a dense solve, η = 1/L at w*."""
    w_star = _newton(inner_loss, torch.zeros(dim, dtype=DTYPE), lam)
    H = torch.func.hessian(inner_loss)(w_star, lam)
    cross = torch.func.jacrev(torch.func.grad(inner_loss), argnums=1)(w_star, lam)
    gw, gl = torch.func.grad(outer_loss, argnums=(0, 1))(w_star, lam)
    exact = gl - cross.T @ torch.linalg.solve(H, gw)
    ev = torch.linalg.eigvalsh(H)
    return Problem(name, inner_loss, outer_loss, lam, torch.zeros(dim, dtype=DTYPE), w_star, exact,
                   1.0 / float(ev[-1]), float(1 - ev[0] / ev[-1]))


def _logistic(name: str, X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor,
              lam: torch.Tensor) -> Problem:
    def inner_loss(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-yv * (Xv @ w)).mean()

    return _finish(name, inner_loss, outer_loss, lam, X.shape[1])


def make_problem(name: str, cfg: Config) -> Problem:
    """One of :data:`PROBLEMS`, drawn from ``cfg.seed``."""
    g = torch.Generator().manual_seed(cfg.seed * 100 + PROBLEMS.index(name))
    if name == "logreg":
        w_true = torch.randn(cfg.d, generator=g, dtype=DTYPE)
        X = torch.randn(2 * cfg.n, cfg.d, generator=g, dtype=DTYPE)
        y = torch.sign(X @ w_true + 0.5 * torch.randn(2 * cfg.n, generator=g, dtype=DTYPE))
        lam = math.log(cfg.reg) + 0.5 * torch.randn(cfg.d, generator=g, dtype=DTYPE)
        return _logistic(name, X[: cfg.n], y[: cfg.n], X[cfg.n:], y[cfg.n:], lam)
    if name == "logreg-cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        X = torch.tensor(data.data, dtype=DTYPE)
        y = 2 * torch.tensor(data.target, dtype=DTYPE) - 1
        perm = torch.randperm(len(y), generator=g)
        X, y = X[perm], y[perm]
        X = (X - X.mean(0)) / X.std(0)
        if cfg.n < 200:  # --quick: fewer samples and features
            X, y = X[: 2 * cfg.n, : cfg.d], y[: 2 * cfg.n]
        half = len(y) // 2
        lam = math.log(cfg.reg) + 0.5 * torch.randn(X.shape[1], generator=g, dtype=DTYPE)
        return _logistic(name, X[:half], y[:half], X[half:], y[half:], lam)
    n = cfg.n_kernel
    x = torch.rand(2 * n, 2, generator=g, dtype=DTYPE) * 4 - 2
    t = torch.sin(2 * x[:, 0]) * torch.cos(x[:, 1]) + 0.1 * torch.randn(2 * n, generator=g, dtype=DTYPE)
    xt, yt, xv, yv = x[:n], t[:n], x[n:], t[n:]

    def kernel(a: torch.Tensor, b: torch.Tensor, log_width: torch.Tensor) -> torch.Tensor:
        return torch.exp(-log_width.exp() * torch.cdist(a, b) ** 2)

    def inner_loss(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        K = kernel(xt, xt, lam[1])
        return 0.5 * w @ (K @ w) + 0.5 * lam[0].exp() * (w @ w) - w @ yt

    def outer_loss(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((kernel(xv, xt, lam[1]) @ w - yv) ** 2).mean()

    return _finish(name, inner_loss, outer_loss, torch.tensor([math.log(0.05), math.log(1.0)], dtype=DTYPE), n)


def _aid(p: Problem, w: torch.Tensor, method: str, t: int) -> tuple[torch.Tensor, Any]:
    if method == "AID-CG":
        form, solver = {"inner_loss": p.inner_loss}, bilevel.CG(maxiter=t, tol=0.0)
    else:
        form = {"fixed_point": p.step}
        solver = (bilevel.FixedPoint if method == "AID-FP" else bilevel.Neumann)(maxiter=t, tol=0.0)
    return bilevel.hypergrad(p.outer_loss, w, p.hparams, solver=solver, return_info=True, inner_tol=math.inf,
                             estimate=True, **form)


def curves(p: Problem, cfg: Config) -> dict[str, Any]:
    """True error and estimate of each method for t = 1, 2, 4, … (T = K = t)."""
    ts = [2**i for i in range(cfg.max_log2_t + 1)]
    out: dict[str, Any] = {m: {"t": ts, "error": [], "estimate": [], "contraction": []} for m in METHODS}
    scale = float(p.exact.norm())
    w, done = p.w0.clone(), 0
    for t in ts:
        with torch.no_grad():
            for _ in range(t - done):
                w = p.step(w, p.hparams)
        done = t
        lam = p.hparams.clone().requires_grad_()
        wt = bilevel.unroll(p.step, p.w0, lam, t)
        (g_itd,) = torch.autograd.grad(p.outer_loss(wt, lam), lam)
        out["ITD"]["error"].append(float((g_itd - p.exact).norm()) / scale)
        # ITD's estimate: its distance to AID-CG at w_t, plus AID-CG's own estimate there
        itd_err = bilevel.hypergrad_error(g_itd, p.outer_loss, wt.detach(), p.hparams, inner_loss=p.inner_loss)
        out["ITD"]["estimate"].append(float(itd_err.total) / scale)
        for m in METHODS[1:]:
            hg, info = _aid(p, w, m, t)
            out[m]["error"].append(float((hg - p.exact).norm()) / scale)
            out[m]["estimate"].append(float(info.error_estimate) / scale)
            out[m]["contraction"].append(float(info.contraction))
    for m in METHODS:
        out[m]["rate"] = fit_rate(ts, out[m]["error"])
    return out


def fit_rate(ts: list[int], errors: list[float]) -> float:
    """r of error ≈ C·r^t, least squares on log error over the points above rounding (1e-13)."""
    pts = [(t, math.log(e)) for t, e in zip(ts, errors) if e > 1e-13]
    if len(pts) < 2:
        return float("nan")
    mt = sum(t for t, _ in pts) / len(pts)
    me = sum(e for _, e in pts) / len(pts)
    slope = sum((t - mt) * (e - me) for t, e in pts) / sum((t - mt) ** 2 for t, _ in pts)
    return math.exp(slope)


def budgets(p: Problem, cfg: Config) -> dict[str, Any]:
    """Cost of reaching ε·‖∇F‖ with AID-CG: hypergrad_within vs the cheapest fixed (T, K) grid point."""
    scale = float(p.exact.norm())
    grid = [2**i for i in range(cfg.max_log2_t + 3)]
    res: dict[str, Any] = {}
    inner_at: dict[int, torch.Tensor] = {}
    w, done = p.w0.clone(), 0
    for T in grid:
        with torch.no_grad():
            for _ in range(T - done):
                w = p.step(w, p.hparams)
        done, inner_at[T] = T, w
    for eps in EPSILONS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", bilevel.ConvergenceWarning)
            hg, _, info = bilevel.hypergrad_within(p.outer_loss, p.w0, p.hparams, tol=eps * scale, inner_step=p.step,
                                                   inner_loss=p.inner_loss, max_inner=grid[-1])
        auto = {"T": info.inner_iterations, "K": info.iterations, "estimate_products": info.error.products,
                "cost": info.inner_iterations + info.iterations + info.error.products,
                "error": float((hg - p.exact).norm()) / scale, "warned": bool(caught)}
        best = None
        k_grid = [k for k in grid if k <= 2 * p.w_star.numel()]  # CG is exact after dim steps
        for T in grid:
            for K in k_grid:
                if best is not None and T + K >= best["cost"]:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
                    g = bilevel.hypergrad(p.outer_loss, inner_at[T], p.hparams, inner_loss=p.inner_loss,
                                          solver=bilevel.CG(maxiter=K, tol=0.0), inner_tol=math.inf)
                if float((g - p.exact).norm()) <= eps * scale:
                    best = {"T": T, "K": K, "cost": T + K}
        res[f"{eps:g}"] = {"auto": auto, "grid": best,
                           "ratio": None if best is None else auto["cost"] / best["cost"]}
    return res


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True) -> dict[str, Any]:
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=CHECKPOINT_KEYS)
    ckpt = out / _runs.CHECKPOINT
    state: dict[str, Any] = {"step": 0, "problems": {}} if saved is None else \
        {"step": saved["step"], "problems": saved["problems"]}
    t0 = time.perf_counter()

    def save(st: dict[str, Any]) -> None:
        _runs.save_checkpoint(ckpt, {"config": dataclasses.asdict(cfg), **st})

    for i in _runs.steps(len(PROBLEMS), state, save, desc="problems", show=show):
        name = PROBLEMS[i]
        p = make_problem(name, cfg)
        state["problems"][name] = {"dim": int(p.w_star.numel()), "q": p.q, "curves": curves(p, cfg),
                                   "budgets": budgets(p, cfg)}
    results = {"config": dataclasses.asdict(cfg), "problems": state["problems"],
               "scales": {"hparams": "log", "error": "relative to |grad F|"},
               "seconds": time.perf_counter() - t0}
    _runs.write_json(out / "results.json", results)
    plot(results, out / "iteration_complexity.png")
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    """True error (solid) and estimate (dashed) vs t, one panel per problem; from results.json alone."""
    probs = results["problems"]
    fig, axes = _runs.figure(ncols=len(probs), size=(4.6 * len(probs), 3.8))
    axes = list(axes) if len(probs) > 1 else [axes]
    for ax, (name, pr) in zip(axes, probs.items()):
        for k, m in enumerate(METHODS):
            c = pr["curves"][m]
            color = _runs.PALETTE[k]
            ax.semilogy(c["t"], [max(e, 1e-17) for e in c["error"]], "o-", ms=3, color=color,
                        label=f"{m} (rate {c['rate']:.3f})")
            if c["estimate"]:
                ax.semilogy(c["t"], [max(e, 1e-17) for e in c["estimate"]], "--", color=color, lw=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name} (q = {pr['q']:.3f})", fontsize=9)
        ax.set_xlabel("t (inner steps = linear steps)")
        ax.set_ylabel("relative error (dashed: estimate)")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def table(results: dict[str, Any]) -> str:
    lines = [f"{'problem':14s} {'q':>7s} {'method':12s} {'rate':>7s} {'q_hat':>7s} {'err@t_max':>10s} "
             f"{'est@t_max':>10s}"]
    for name, pr in results["problems"].items():
        for m in METHODS:
            c = pr["curves"][m]
            qh = f"{c['contraction'][-1]:7.3f}" if c["contraction"] else f"{'-':>7s}"
            est = f"{c['estimate'][-1]:10.2e}" if c["estimate"] else f"{'-':>10s}"
            lines.append(f"{name:14s} {pr['q']:7.3f} {m:12s} {c['rate']:7.3f} {qh} {c['error'][-1]:10.2e} {est}")
    lines.append("")
    lines.append(f"{'problem':14s} {'eps':>6s} {'auto T':>7s} {'auto K':>7s} {'auto P':>7s} {'auto cost':>9s} "
                 f"{'auto err':>9s} {'grid T':>7s} {'grid K':>7s} {'ratio':>6s}")
    for name, pr in results["problems"].items():
        for eps, b in pr["budgets"].items():
            a, g = b["auto"], b["grid"]
            gt, gk = ("-", "-") if g is None else (str(g["T"]), str(g["K"]))
            ratio = "-" if b["ratio"] is None else f"{b['ratio']:.2f}"
            lines.append(f"{name:14s} {eps:>6s} {a['T']:7d} {a['K']:7d} {a['estimate_products']:7d} "
                         f"{a['cost']:9d} {a['error']:9.1e} {gt:>7s} {gk:>7s} {ratio:>6s}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = _runs.job_parser("bilevel run iteration-complexity",
                         "Hypergradient error vs iterations for ITD, AID-FP, AID-Neumann and AID-CG, with the "
                         "a-posteriori error estimates, and the cost of automatic budgets (ICML 2020).",
                         "runs/iteration-complexity", device=True, checkpoint_every=True)
    p.add_argument("--max-log2-t", dest="max_log2_t", type=int, default=None,
                   help=f"largest t is 2 to this power (default {Config.max_log2_t})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _runs.resolve_device(args.device)  # cpu only: the problems are small (a clean refusal otherwise)
    cfg = Config(**_runs.config_kwargs(args, QUICK, {"max_log2_t": 1}))
    with _runs.one_thread():
        res = run(cfg, Path(args.out), resume=args.resume, show=not args.no_progress)
    print(table(res))
    print(f"{len(PROBLEMS)} problems in {res['seconds']:.1f}s; "
          f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'iteration_complexity.png'}")
    return 0

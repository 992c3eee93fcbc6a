"""Sample complexity of stochastic bilevel solvers, with and without warm start.

A synthetic bilevel problem with a known solution (population quantities in closed form):
data ``x ~ N(0, Σ)``, ``y = xᵀw̄ + σ ε``; per batch ``(X, y)`` of size ``b``::

    inner   Φ̂(w, λ, (X, y)) = w − η (Xᵀ(Xw − y)/b + ρ w − Bλ)      E Φ̂ = w − η(Hw − Σw̄ − Bλ)
    outer   f̂(w, λ, (X', y')) = ½‖X'w − y'‖²/b' + ½ μ‖λ‖²

with ``H = Σ + ρI``, so ``w(λ) = H⁻¹(Σw̄ + Bλ)``, ``F(λ) = ½(w(λ) − w̄)ᵀΣ(w(λ) − w̄) + ½σ²
+ ½μ‖λ‖²`` is a strongly convex quadratic and ``λ* = −(MᵀΣM + μI)⁻¹MᵀΣ(H⁻¹Σw̄ − w̄)``,
``M = H⁻¹B``.  ``Φ = E Φ̂`` is a contraction with ``q = 1 − η μ_min(H)``.

Experiment (Grazzi, Pontil, Salzo, JMLR 2023): for accuracy levels ``j = 0..L−1`` the
no-warm-start method (:class:`bilevel.StochasticBilevel`, ``warm_start=False``) uses
batches of size ``b_j = b_0·2^j`` (∝ 1/ε), ``t_j = k_j ∝ log b_j`` inner and linear
steps from a fixed start, and ``S_j ∝ log b_j`` outer steps; the warm-start variant uses
the same batches with 2 inner and 2 linear steps per outer step, carried over.  After the
run, the error ``‖λ_S − λ*‖²`` and ``‖∇F(λ_S)‖²`` (exact) are averaged over ``reps`` seeds
and plotted against the samples used; the slopes of the log-log lines are fitted.

Theory: JMLR 2023 reaches ``E‖∇F‖² ≤ ε`` with O(ε⁻²) samples (Õ, log factors) for any
smooth F (slope ≥ −1/2 of E‖∇F‖² vs samples); F here is strongly convex, so the variance
term dominates and ``ε ∝ 1/b`` with Õ(ε⁻¹) samples (slope ≈ −1 up to the logs).

    bilevel run sample-complexity [--out runs/sample-complexity] [--quick] [--resume]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import bilevel
from bilevel.apps import _runs

DTYPE = torch.float64


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``."""

    d: int = 10  # inner dimension
    m: int = 4  # hyperparameters
    levels: int = 6  # accuracy levels: batch sizes b0·2^j
    reps: int = 6  # seeds per level
    b0: int = 16
    seed: int = 0
    rho: float = 0.5  # ridge of the inner problem
    mu: float = 0.05  # ridge of the outer problem
    noise: float = 1.0  # σ, label noise
    lr: float = 0.5  # outer step, in units of 1/L_F
    outer_steps0: int = 8  # S_j = outer_steps0 + outer_steps_per_level·j
    outer_steps_per_level: int = 1
    inner_steps0: int = 4  # t_j = k_j = inner_steps0 + inner_steps_per_level·j
    inner_steps_per_level: int = 1
    warm_steps: int = 2  # inner = linear steps per outer step, warm start


QUICK = {"levels": 3, "reps": 2}  # about 5 s


@dataclass(frozen=True)
class QuadraticBilevel:
    """The synthetic problem; ``fixed_point``/``outer_loss`` take ``(params, hparams, batch)``."""

    cov_sqrt: torch.Tensor  # Σ^{1/2}
    w_bar: torch.Tensor
    B: torch.Tensor
    rho: float
    mu: float
    noise: float
    eta: float  # step inside Φ̂

    @property
    def cov(self) -> torch.Tensor:
        return self.cov_sqrt @ self.cov_sqrt

    @property
    def H(self) -> torch.Tensor:
        return self.cov + self.rho * torch.eye(len(self.w_bar), dtype=DTYPE)

    def fixed_point(self, w: torch.Tensor, lam: torch.Tensor, batch: Any) -> torch.Tensor:
        X, y = batch
        return w - self.eta * (X.T @ (X @ w - y) / len(y) + self.rho * w - self.B @ lam)

    def outer_loss(self, w: torch.Tensor, lam: torch.Tensor, batch: Any) -> torch.Tensor:
        X, y = batch
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * self.mu * (lam**2).sum()

    # population (full-data) versions, for the deterministic solvers and the exact answers
    def fixed_point_full(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return w - self.eta * (self.H @ w - self.cov @ self.w_bar - self.B @ lam)

    def outer_loss_full(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        e = w - self.w_bar
        return 0.5 * e @ self.cov @ e + 0.5 * self.noise**2 + 0.5 * self.mu * (lam**2).sum()

    def solution(self, lam: torch.Tensor) -> torch.Tensor:
        """w(λ) = H⁻¹(Σw̄ + Bλ)."""
        return torch.linalg.solve(self.H, self.cov @ self.w_bar + self.B @ lam)

    def hessian_F(self) -> torch.Tensor:
        M = torch.linalg.solve(self.H, self.B)
        return M.T @ self.cov @ M + self.mu * torch.eye(self.B.shape[1], dtype=DTYPE)

    def grad_F(self, lam: torch.Tensor) -> torch.Tensor:
        """∇F(λ) = Mᵀ Σ (w(λ) − w̄) + μλ, exact."""
        M = torch.linalg.solve(self.H, self.B)
        return M.T @ self.cov @ (self.solution(lam) - self.w_bar) + self.mu * lam

    def lam_star(self) -> torch.Tensor:
        return torch.linalg.solve(self.hessian_F(), -self.grad_F(torch.zeros(self.B.shape[1], dtype=DTYPE)))

    def contraction(self) -> float:
        """q = ‖I − ηH‖ of the expected map."""
        return float(torch.linalg.matrix_norm(torch.eye(len(self.w_bar), dtype=DTYPE) - self.eta * self.H, 2))


def make_problem(d: int = 10, m: int = 4, *, seed: int = 0, rho: float = 0.5, mu: float = 0.05,
                 noise: float = 1.0) -> QuadraticBilevel:
    """Σ with eigenvalues in [0.5, 1.5], orthonormal B (d × m), η = 1/λ_max(H): q = 1 − μ_min(H)/λ_max(H)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    s = torch.linspace(0.5, 1.5, d, dtype=DTYPE)
    cov_sqrt = Q @ torch.diag(s.sqrt()) @ Q.T
    B, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=DTYPE))
    w_bar = torch.randn(d, generator=g, dtype=DTYPE)
    eta = 1.0 / (float(s.max()) + rho)
    return QuadraticBilevel(cov_sqrt, w_bar, B, rho, mu, noise, eta)


class GaussianBatches:
    """An endless stream of batches ``(X, y)``, ``x ~ N(0, Σ)``, ``y = xᵀw̄ + σε``; seeded."""

    def __init__(self, problem: QuadraticBilevel, batch_size: int, seed: int):
        self.problem, self.batch_size, self.seed = problem, batch_size, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p, b = self.problem, self.batch_size
        g = torch.Generator().manual_seed(self.seed)
        d = len(p.w_bar)
        while True:
            X = torch.randn(b, d, generator=g, dtype=DTYPE) @ p.cov_sqrt
            yield X, X @ p.w_bar + p.noise * torch.randn(b, generator=g, dtype=DTYPE)


def level_settings(cfg: Config, j: int, warm: bool) -> dict[str, int]:
    b = cfg.b0 * 2**j
    t = cfg.warm_steps if warm else cfg.inner_steps0 + cfg.inner_steps_per_level * j
    s = cfg.outer_steps0 + cfg.outer_steps_per_level * j
    return {"batch": b, "inner_steps": t, "linear_steps": t, "outer_steps": 2 * s if warm else s}


def one_run(prob: QuadraticBilevel, cfg: Config, j: int, rep: int, warm: bool) -> dict[str, Any]:
    """One outer run at level j; returns the errors at the last λ and the samples used."""
    st = level_settings(cfg, j, warm)
    seed = 1000 * cfg.seed + 100 * j + rep
    lf = float(torch.linalg.eigvalsh(prob.hessian_F()).max())
    solver = bilevel.StochasticBilevel(
        prob.outer_loss,
        torch.zeros(cfg.d, dtype=DTYPE),
        GaussianBatches(prob, st["batch"], 2 * seed),
        fixed_point=prob.fixed_point,
        outer_batches=GaussianBatches(prob, st["batch"], 2 * seed + 1),
        lr=cfg.lr / lf,
        inner_steps=st["inner_steps"],
        linear_steps=st["linear_steps"],
        warm_start=warm,
    )
    state, infos = solver.run(torch.zeros(cfg.m, dtype=DTYPE), st["outer_steps"])
    lam = state.hparams
    return {
        **st,
        "samples": state.samples,
        "lam_err2": float(((lam - prob.lam_star()) ** 2).sum()),
        "grad_norm2": float((prob.grad_F(lam) ** 2).sum()),
        "last_hypergrad_norm": infos[-1].hypergrad_norm,
    }


def fit_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx = torch.tensor(x, dtype=DTYPE).log()
    ly = torch.tensor(y, dtype=DTYPE).log()
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx**2).sum())


METHODS = {"no-warm-start (JMLR 2023)": False, "warm start": True}


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True) -> dict[str, Any]:
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=("runs",))
    ckpt = out / _runs.CHECKPOINT
    prob = make_problem(cfg.d, cfg.m, seed=cfg.seed, rho=cfg.rho, mu=cfg.mu, noise=cfg.noise)
    done: dict[str, Any] = {} if saved is None else saved["runs"]
    tasks = [(name, j, r) for name in METHODS for j in range(cfg.levels) for r in range(cfg.reps)]
    t0 = time.perf_counter()
    bar = _runs.progress(tasks, desc="runs", unit="run") if show else tasks
    for name, j, r in bar:
        key = f"{name}|{j}|{r}"
        if key in done:
            continue
        done[key] = one_run(prob, cfg, j, r, METHODS[name])
        _runs.save_checkpoint(ckpt, {"config": dataclasses.asdict(cfg), "runs": done})
    curves: dict[str, Any] = {}
    for name in METHODS:
        pts = []
        for j in range(cfg.levels):
            rs = [done[f"{name}|{j}|{r}"] for r in range(cfg.reps)]
            pts.append({
                **{k: rs[0][k] for k in ("batch", "inner_steps", "linear_steps", "outer_steps")},
                "samples": sum(x["samples"] for x in rs) / len(rs),
                "lam_err2": sum(x["lam_err2"] for x in rs) / len(rs),
                "grad_norm2": sum(x["grad_norm2"] for x in rs) / len(rs),
            })
        samples = [p["samples"] for p in pts]
        curves[name] = {
            "points": pts,
            "slope_lam_err2": fit_slope(samples, [p["lam_err2"] for p in pts]),
            "slope_grad_norm2": fit_slope(samples, [p["grad_norm2"] for p in pts]),
        }
    results = {
        "config": dataclasses.asdict(cfg),
        "scales": {"problem.lam_star": "linear"},
        "problem": {"q": prob.contraction(), "eta": prob.eta, "lam_star": prob.lam_star(),
                    "cond_F": float(torch.linalg.cond(prob.hessian_F()))},
        "theory": {
            "nonconvex_JMLR2023": "O(eps^-2) samples for E|grad F|^2 <= eps: slope >= -0.5",
            "strongly_convex": "O(eps^-1 log) samples: slope ~ -1",
        },
        "curves": curves,
        "seconds": time.perf_counter() - t0,
    }
    _runs.write_json(out / "results.json", results)
    plot(results, out / "sample_complexity.png")
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "lam_err2", "‖λ − λ*‖²"), (axes[1], "grad_norm2", "‖∇F(λ)‖²")):
        for name, c in results["curves"].items():
            x = [p["samples"] for p in c["points"]]
            y = [p[key] for p in c["points"]]
            ax.loglog(x, y, "o-", label=f"{name} (slope {c['slope_' + key]:.2f})")
        x0 = [p["samples"] for p in next(iter(results["curves"].values()))["points"]]
        y0 = next(iter(results["curves"].values()))["points"][0][key]
        for slope, style in ((-1.0, "k--"), (-0.5, "k:")):
            ax.loglog([x0[0], x0[-1]], [y0, y0 * (x0[-1] / x0[0]) ** slope], style, lw=0.8,
                      label=f"slope {slope:g}")
        ax.set_xlabel("samples")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("Stochastic bilevel: outer error vs samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    lines = [f"{'method':28s} {'batch':>6s} {'t=k':>4s} {'S':>4s} {'samples':>10s} {'|lam-lam*|^2':>13s} "
             f"{'|gradF|^2':>11s}"]
    for name, c in results["curves"].items():
        for p in c["points"]:
            lines.append(f"{name:28s} {p['batch']:6d} {p['inner_steps']:4d} {p['outer_steps']:4d} "
                         f"{p['samples']:10.0f} {p['lam_err2']:13.3e} {p['grad_norm2']:11.3e}")
    lines.append("")
    lines.append(f"{'slopes (log err vs log samples)':40s} {'|lam-lam*|^2':>13s} {'|gradF|^2':>11s}   theory")
    for name, c in results["curves"].items():
        lines.append(f"{name:40s} {c['slope_lam_err2']:13.2f} {c['slope_grad_norm2']:11.2f}   "
                     "-1 (strongly convex, O~(1/eps)); >= -0.5 guaranteed (O(eps^-2), JMLR 2023)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = _runs.job_parser("bilevel run sample-complexity",
                         "Outer error vs samples of stochastic bilevel solvers, with and without warm start, "
                         "on a quadratic problem with known λ*.", "runs/sample-complexity")
    p.add_argument("--levels", type=int, default=None, help=f"accuracy levels (default {Config.levels})")
    p.add_argument("--reps", type=int, default=None, help=f"seeds per level (default {Config.reps})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = Config(**_runs.config_kwargs(args, QUICK, {"levels": 2, "reps": 1}))
    with _runs.one_thread():  # tiny problem: one thread is fastest
        res = run(cfg, Path(args.out), resume=args.resume, show=not args.no_progress)
    pr = res["problem"]
    print(f"quadratic bilevel problem: d={cfg.d}, m={cfg.m}, inner contraction q={pr['q']:.3f}, "
          f"cond(∇²F)={pr['cond_F']:.1f}; {cfg.levels} levels x {cfg.reps} seeds in {res['seconds']:.1f}s")
    print(table(res))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'sample_complexity.png'}")
    return 0

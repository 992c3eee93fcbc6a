"""Learning-rate and momentum schedules by forward-mode hypergradients (Far-HO).

Inner problem: an MLP ``x ↦ W2 tanh(W1 x + b1) + b2`` trained by T steps of SGD with heavy-ball
momentum on mini-batches drawn once from a fixed-seed sequence::

    v_{t+1} = μ_t v_t + ∇ CE_{B_t}(w_t),        w_{t+1} = w_t − η_t v_{t+1},    t = 0 … T−1

The schedule has few numbers (the Far-HO setting: forward mode is cheap when the
hyperparameters are few and T is long): ``log η_t`` and ``logit μ_t`` are piecewise linear
in t between K knots spread evenly over [0, T−1], so λ = (log η knots, logit μ knots) has
2K entries.  Outer problem: ``min_λ F(λ) = CE_val(w_T(λ))``, by Adam on λ with the exact
hypergradient of the unrolled training run from :func:`bilevel.forward_hypergrad` (it carries
``Z_t = dw_t/dλ`` forward, one JVP per direction per step: memory O(|w|·2K) for any T) —
Franceschi, Donini, Frasconi, Pontil, "Forward and reverse gradient-based hyperparameter
optimization", ICML 2017; Maclaurin, Duvenaud, Adams, ICML 2015 for the reverse-mode view.

Baseline at equal compute: one hypergradient carries 1 + 2K tangents through T steps, so it
is counted as 1 + 2K training runs; the best constant (η, μ) is chosen by validation loss
from a grid of ``steps · (1 + 2K)`` training runs (log-spaced η × the momenta of
``grid_momenta``).  Measured wall times of both are reported beside the count.

    bilevel run lr-schedule [--out runs/lr-schedule] [--steps N] [--seed S] [--resume] [--quick]
                            [--dataset digits|fashion-mnist|mnist] [--data-dir DIR] [--device cpu|cuda]
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
import torch.nn.functional as F

import bilevel
from bilevel.apps import _data, _runs

Params = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # W1, b1, W2, b2
State = tuple[Params, Params]  # (weights, momentum buffer)
HParams = dict[str, torch.Tensor]  # {"log_lr": K, "logit_momentum": K}


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``."""

    steps: int = 15  # outer (Adam) steps, one forward-mode hypergradient each
    seed: int = 0
    dataset: str = "digits"
    data_dir: str | None = None
    n_train: int = 700  # drawn from the dataset's training part (digits: from all 1797 images) ...
    n_val: int = 300  # ... as the validation set; the test set is the test part (digits: the rest)
    hidden: int = 32
    batch: int = 64
    train_steps: int = 500  # T: SGD steps of one training run
    knots: int = 10  # K: knots of each schedule (2K hyperparameters)
    block: int = 10  # SGD steps per call of the step map (fewer calls: less overhead, same numbers)
    lr0: float = 0.05  # initial schedule: constant η and μ
    momentum0: float = 0.5
    outer_lr: float = 0.3  # Adam on the knots (log / logit scale): up to a factor e^0.3 per step
    lr_box: tuple[float, float] = (1e-3, 2.0)  # η is kept in this range (grid spans it too)
    momentum_max: float = 0.95  # μ in [1 − momentum_max, momentum_max] for the learned schedule
    grid_momenta: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9, 0.95)
    curve_every: int = 20  # loss-curve points every this many SGD steps


QUICK = {"steps": 3, "n_train": 200, "n_val": 100, "hidden": 8, "train_steps": 40, "knots": 3, "block": 5,
         "grid_momenta": (0.0, 0.9), "curve_every": 10}

CHECKPOINT_KEYS = ("step", "hparams", "adam", "history", "grid", "best")
HISTORY_KEYS = ("val_loss", "hypergrad_norm", "lr_min", "lr_max", "momentum_mean", "seconds", "backtracks")


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Data(_data.Split):
    n_classes: int
    source: str


def load_data(cfg: Config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Data:
    """``cfg.dataset`` (pixels in [0, 1]); train / validation drawn with ``cfg.seed`` from its
    training part and its test part kept as the test set (digits: all three drawn from the 1797)."""
    images = _data.load_images(cfg.dataset, cfg.data_dir)
    X, y, X_test, y_test = images.X_train, images.y_train, images.X_test, images.y_test
    if cfg.dataset == "digits":
        # the bundled file is ordered by writer: its 1000 / 797 split is a shift of writers,
        # so train, validation and test are drawn from all 1797 images instead
        X, y = torch.cat([X, X_test]), torch.cat([y, y_test])
    n = len(y)
    if cfg.n_train + cfg.n_val >= n:
        raise _runs.UserError(f"n_train + n_val = {cfg.n_train + cfg.n_val} leaves nothing of the {n} images of "
                              f"{cfg.dataset}: pass smaller --n-train / --n-val")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    tr, va = perm[: cfg.n_train], perm[cfg.n_train : cfg.n_train + cfg.n_val]
    if cfg.dataset == "digits":
        te = perm[cfg.n_train + cfg.n_val :]
        X_test, y_test = X[te], y[te]
    put = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    return Data(put(X[tr]), put(y[tr]), put(X[va]), put(y[va]), put(X_test), put(y_test), int(y.max()) + 1,
                images.source)


# ----------------------------------------------------------------------------- the inner problem


def cross_entropy(w: Params, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    W1, b1, W2, b2 = w
    return F.cross_entropy(torch.tanh(X @ W1 + b1) @ W2 + b2, y)


def accuracy(w: Params, X: torch.Tensor, y: torch.Tensor) -> float:
    W1, b1, W2, b2 = w
    return float(((torch.tanh(X @ W1 + b1) @ W2 + b2).argmax(1) == y).float().mean())


def batch_grad(w: Params, X: torch.Tensor, Y: torch.Tensor) -> Params:
    """∇_w of the mean cross-entropy on the batch (``Y`` one-hot), by hand: the two-layer
    backward pass is a few matmuls, and forward mode then differentiates plain tensor code
    (``torch.func.grad`` inside every step cost 5× the time here)."""
    W1, b1, W2, b2 = w
    a = torch.tanh(X @ W1 + b1)
    d_logits = (torch.softmax(a @ W2 + b2, -1) - Y) / X.shape[0]
    d_pre = (d_logits @ W2.T) * (1 - a * a)
    return X.T @ d_pre, d_pre.sum(0), a.T @ d_logits, d_logits.sum(0)


def init_state(cfg: Config, data: Data) -> State:
    """Glorot-scaled weights from ``cfg.seed``, zero momentum buffer."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    d, h, c = data.X_train.shape[1], cfg.hidden, data.n_classes
    kw = {"dtype": data.X_train.dtype, "device": data.X_train.device}
    w = (
        (torch.randn(d, h, generator=gen) * math.sqrt(1.0 / d)).to(**kw),
        torch.zeros(h, **kw),
        (torch.randn(h, c, generator=gen) * math.sqrt(1.0 / h)).to(**kw),
        torch.zeros(c, **kw),
    )
    return w, tuple(torch.zeros_like(p) for p in w)


def batches(cfg: Config, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed mini-batch sequence (seeded by ``cfg.seed``): inputs ``T × B × d`` and one-hot labels."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    idx = torch.randint(0, len(data.y_train), (cfg.train_steps, cfg.batch), generator=gen).to(data.X_train.device)
    Y = F.one_hot(data.y_train, data.n_classes).to(data.X_train.dtype)
    return data.X_train[idx], Y[idx]


def knot_weights(cfg: Config, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> torch.Tensor:
    """``A`` (T × K): row t holds the hat-function weights of the K knots at step t, so that
    a knot vector ``k`` gives the piecewise-linear curve ``A @ k``."""
    t = torch.arange(cfg.train_steps, dtype=dtype, device=device) * (cfg.knots - 1) / max(cfg.train_steps - 1, 1)
    return torch.clamp(1 - (t[:, None] - torch.arange(cfg.knots, dtype=dtype, device=device)[None]).abs(), min=0)


def schedule(hparams: HParams, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step ``(η_t, μ_t)`` of the knots: ``η = exp(A log_lr)``, ``μ = σ(A logit_momentum)``."""
    return (A @ hparams["log_lr"]).exp(), torch.sigmoid(A @ hparams["logit_momentum"])


def sgd_step(state: State, lr: torch.Tensor, momentum: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> State:
    w, v = state
    g = batch_grad(w, X, Y)
    v = tuple(momentum * vi + gi for vi, gi in zip(v, g))
    return tuple(wi - lr * vi for wi, vi in zip(w, v)), v


def make_step(cfg: Config, data: Data) -> Callable[[State, HParams, int], State]:
    """The map ``state_{b+1} = Φ(state_b, λ, b)`` of ``cfg.block`` SGD steps, for
    ``forward_hypergrad(..., indexed=True)`` and ``unroll(..., indexed=True)`` with
    ``T / block`` steps.  Blocking changes no number, only the per-call overhead."""
    Xs, Ys = batches(cfg, data)
    A = knot_weights(cfg, data.X_train.dtype, data.X_train.device)

    def step(state: State, hparams: HParams, b: int) -> State:
        t0 = b * cfg.block
        lrs, moms = schedule(hparams, A[t0 : t0 + cfg.block])
        for i in range(lrs.shape[0]):
            state = sgd_step(state, lrs[i], moms[i], Xs[t0 + i], Ys[t0 + i])
        return state

    return step


def n_blocks(cfg: Config) -> int:
    return cfg.train_steps // cfg.block


def outer_loss_fn(data: Data) -> Callable[[State, HParams], torch.Tensor]:
    def outer_loss(state: State, hparams: HParams) -> torch.Tensor:
        return cross_entropy(state[0], data.X_val, data.y_val)

    return outer_loss


def hypergradient(cfg: Config, data: Data, hparams: HParams) -> tuple[HParams, torch.Tensor]:
    """``(∇F(λ), F(λ))``: the validation loss after T steps and its exact gradient w.r.t. the knots."""
    outer_loss = outer_loss_fn(data)
    hg, state = bilevel.forward_hypergrad(outer_loss, make_step(cfg, data), init_state(cfg, data), hparams,
                                          n_blocks(cfg), indexed=True, return_params=True)
    return hg, outer_loss(state, hparams)


def train(cfg: Config, data: Data, lr: torch.Tensor, momentum: torch.Tensor, *, curves: bool = False
          ) -> dict[str, Any]:
    """One plain training run with per-step ``lr`` and ``momentum`` (length T); final losses,
    and with ``curves`` the full-train and validation loss every ``curve_every`` steps."""
    Xs, Ys = batches(cfg, data)
    state = init_state(cfg, data)
    curve: dict[str, list[float]] = {"step": [], "train_loss": [], "val_loss": []}

    def record(t: int) -> None:
        curve["step"].append(t)
        curve["train_loss"].append(float(cross_entropy(state[0], data.X_train, data.y_train)))
        curve["val_loss"].append(float(cross_entropy(state[0], data.X_val, data.y_val)))

    with torch.no_grad():
        for t in range(cfg.train_steps):
            if curves and t % cfg.curve_every == 0:
                record(t)
            state = sgd_step(state, lr[t], momentum[t], Xs[t], Ys[t])
        if curves:
            record(cfg.train_steps)
        w = state[0]
        out = {"val_loss": _finite(cross_entropy(w, data.X_val, data.y_val)),
               "val_acc": accuracy(w, data.X_val, data.y_val),
               "test_loss": _finite(cross_entropy(w, data.X_test, data.y_test)),
               "test_acc": accuracy(w, data.X_test, data.y_test),
               "train_loss": _finite(cross_entropy(w, data.X_train, data.y_train))}
    if curves:
        out["curve"] = curve
    return out


def _finite(x: torch.Tensor) -> float:
    v = float(x)
    return v if math.isfinite(v) else math.inf  # a diverged run: worst possible, never NaN in a min


# ----------------------------------------------------------------------------- the runs


def initial_hparams(cfg: Config, dtype: torch.dtype = torch.float32) -> HParams:
    return {"log_lr": torch.full((cfg.knots,), math.log(cfg.lr0), dtype=dtype),
            "logit_momentum": torch.full((cfg.knots,), math.log(cfg.momentum0 / (1 - cfg.momentum0)), dtype=dtype)}


def project(cfg: Config, hparams: HParams) -> None:
    """Keep η in ``lr_box`` and μ in [1 − momentum_max, momentum_max] (in place, on the job's own tensors)."""
    m = math.log(cfg.momentum_max / (1 - cfg.momentum_max))
    with torch.no_grad():
        hparams["log_lr"].clamp_(math.log(cfg.lr_box[0]), math.log(cfg.lr_box[1]))
        hparams["logit_momentum"].clamp_(-m, m)


def grid_points(cfg: Config) -> list[tuple[float, float]]:
    """Constant (η, μ) pairs: ``steps · (1 + 2K)`` training runs, the counted compute of the
    learned schedule; log-spaced η over ``lr_box`` for each momentum of ``grid_momenta``."""
    total = cfg.steps * (1 + 2 * cfg.knots)
    per = max(1, total // len(cfg.grid_momenta))
    lrs = torch.logspace(math.log10(cfg.lr_box[0]), math.log10(cfg.lr_box[1]), per, dtype=torch.float64).tolist()
    return [(lr, mom) for mom in cfg.grid_momenta for lr in lrs]


def _fresh_state(cfg: Config) -> dict[str, Any]:
    hp = initial_hparams(cfg)
    return {"config": dataclasses.asdict(cfg), "step": 0, "hparams": hp, "adam": None,
            "history": {k: [] for k in HISTORY_KEYS}, "grid": {"step": 0, "rows": [], "seconds": 0.0},
            "best": {"val_loss": math.inf, "hparams": hp, "step": -1}}


def learn_schedule(cfg: Config, data: Data, state: dict[str, Any], save: Callable[[dict[str, Any]], None],
                   show: bool, every: int = 1) -> None:
    """Adam on the knots with forward-mode hypergradients; a step that makes training diverge
    (``SolverError`` on NaN/Inf) is halved back towards the previous knots.  The iterate with the
    lowest validation loss seen is kept in ``state["best"]`` (the outer loss is not monotone)."""
    hp = {k: v.clone().to(data.X_train.device, data.X_train.dtype) for k, v in state["hparams"].items()}
    leaves = [hp["log_lr"], hp["logit_momentum"]]
    opt = torch.optim.Adam(leaves, lr=cfg.outer_lr)
    if state["adam"] is not None:
        opt.load_state_dict(state["adam"])
    hist = state["history"]
    for _ in _runs.steps(cfg.steps, state, save, every=every, desc="outer steps (forward-mode)", show=show):
        t0 = time.perf_counter()
        backtracks = 0
        previous = {k: v.detach().clone() for k, v in hp.items()}
        while True:
            try:
                hg, val = hypergradient(cfg, data, hp)
                break
            except bilevel.SolverError:
                backtracks += 1
                if backtracks > 20:
                    raise
                with torch.no_grad():
                    for k in hp:
                        hp[k].copy_(0.5 * (hp[k] + previous[k]) if backtracks > 1 else previous[k])
        lr, mom = schedule(hp, knot_weights(cfg, hp["log_lr"].dtype, hp["log_lr"].device))
        hist["val_loss"].append(float(val))
        if float(val) < state["best"]["val_loss"]:  # F is known at every iterate: keep the best one
            state["best"] = {"val_loss": float(val), "hparams": {k: v.detach().cpu().clone() for k, v in hp.items()},
                             "step": len(hist["val_loss"]) - 1}
        hist["hypergrad_norm"].append(float(torch.cat([hg["log_lr"], hg["logit_momentum"]]).norm()))
        hist["lr_min"].append(float(lr.min()))
        hist["lr_max"].append(float(lr.max()))
        hist["momentum_mean"].append(float(mom.mean()))
        hist["backtracks"].append(backtracks)
        for leaf, name in zip(leaves, ("log_lr", "logit_momentum")):
            leaf.grad = hg[name]  # Adam reads .grad: the job's own tensors
        opt.step()
        for leaf in leaves:
            leaf.grad = None
        project(cfg, hp)
        hist["seconds"].append(time.perf_counter() - t0)
        state["hparams"] = {k: v.detach().cpu().clone() for k, v in hp.items()}
        state["adam"] = opt.state_dict()


def grid_search(cfg: Config, data: Data, state: dict[str, Any], save: Callable[[dict[str, Any]], None],
                show: bool, chunk: int = 16) -> None:
    """The constant-(η, μ) grid, ``chunk`` training runs per checkpoint."""
    points = grid_points(cfg)
    grid = state["grid"]
    n_chunks = math.ceil(len(points) / chunk)

    def save_grid(sub: dict[str, Any]) -> None:
        state["grid"] = sub
        save(state)

    for c in _runs.steps(n_chunks, grid, save_grid, desc="constant-rate grid", show=show):
        t0 = time.perf_counter()
        for lr, mom in points[c * chunk : (c + 1) * chunk]:
            T = cfg.train_steps
            r = train(cfg, data, torch.full((T,), lr), torch.full((T,), mom))
            grid["rows"].append({"lr": lr, "momentum": mom, "val_loss": r["val_loss"]})
        grid["seconds"] += time.perf_counter() - t0


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True,
        device: torch.device | str = "cpu", every: int = 1) -> dict[str, Any]:
    """Learned schedule, constant-rate grid at equal compute, curves; ``results.json`` and
    ``lr_schedule.png`` in ``out``."""
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=CHECKPOINT_KEYS)
    if cfg.train_steps % cfg.block:
        raise _runs.UserError(f"block {cfg.block} should divide train_steps {cfg.train_steps}")
    ckpt = out / _runs.CHECKPOINT
    t_start = time.perf_counter()
    data = load_data(cfg, device)
    state = _fresh_state(cfg) if saved is None else saved

    def save(s: dict[str, Any]) -> None:
        _runs.save_checkpoint(ckpt, s)

    # one plain training run and one hypergradient, timed (not part of any result)
    T = cfg.train_steps
    t0 = time.perf_counter()
    train(cfg, data, torch.full((T,), cfg.lr0), torch.full((T,), cfg.momentum0))
    run_seconds = time.perf_counter() - t0

    learn_schedule(cfg, data, state, save, show, every)
    grid_search(cfg, data, state, save, show)

    A = knot_weights(cfg)
    hp = state["best"]["hparams"]
    lr, mom = schedule(hp, A)
    learned = train(cfg, data, lr, mom, curves=True)
    best = min(state["grid"]["rows"], key=lambda r: r["val_loss"])
    constant = train(cfg, data, torch.full((T,), best["lr"]), torch.full((T,), best["momentum"]), curves=True)
    initial = train(cfg, data, torch.full((T,), cfg.lr0), torch.full((T,), cfg.momentum0), curves=True)
    hist = state["history"]
    n_dirs = 2 * cfg.knots
    hg_seconds = sum(hist["seconds"])
    results = {
        "config": dataclasses.asdict(cfg),
        "data": {"dataset": cfg.dataset, "source": data.source, "n_train": len(data.y_train),
                 "n_val": len(data.y_val), "n_test": len(data.y_test), "features": data.X_train.shape[1]},
        "scales": {"log_lr_knots": "log", "logit_momentum_knots": "logit", "lr": "linear", "momentum": "linear",
                   "grid.lr": "linear", "grid.momentum": "linear"},
        "learned": {**{k: v for k, v in learned.items() if k != "curve"},
                    "log_lr_knots": hp["log_lr"].tolist(), "logit_momentum_knots": hp["logit_momentum"].tolist(),
                    "lr": lr.tolist(), "momentum": mom.tolist(), "hyperparameters": n_dirs,
                    "training_run_equivalents": cfg.steps * (1 + n_dirs), "seconds": hg_seconds,
                    "best_outer_step": state["best"]["step"]},
        "best_constant": {**{k: v for k, v in constant.items() if k != "curve"}, "lr": best["lr"],
                          "momentum": best["momentum"], "grid_size": len(state["grid"]["rows"]),
                          "training_run_equivalents": len(state["grid"]["rows"]),
                          "seconds": state["grid"]["seconds"]},
        "initial_constant": {**{k: v for k, v in initial.items() if k != "curve"}, "lr": cfg.lr0,
                             "momentum": cfg.momentum0},
        "curves": {"learned": learned["curve"], "best_constant": constant["curve"], "initial": initial["curve"]},
        "grid": state["grid"]["rows"],
        "history": hist,
        "timings": {"training_run_seconds": run_seconds,
                    "hypergradient_seconds_mean": hg_seconds / max(len(hist["seconds"]), 1),
                    "hypergradient_over_training_run": hg_seconds / max(len(hist["seconds"]), 1) / run_seconds,
                    "counted_hypergradient_over_training_run": 1 + n_dirs,
                    "learn_seconds": hg_seconds, "grid_seconds": state["grid"]["seconds"],
                    "threads": torch.get_num_threads()},
    }
    results["verdict"] = verdict(results)
    results["timings"]["total_seconds"] = time.perf_counter() - t_start
    plot(results, out / "lr_schedule.png")
    _runs.write_json(out / "results.json", results)
    return results


def verdict(res: dict[str, Any]) -> str:
    le, co = res["learned"], res["best_constant"]
    better = "lower" if le["test_loss"] < co["test_loss"] else "not lower"
    return (f"the learned schedule's test loss is {better} than the best constant rate's at equal counted compute "
            f"({le['test_loss']:.4f} vs {co['test_loss']:.4f}; test accuracy {le['test_acc']:.3f} vs "
            f"{co['test_acc']:.3f}; validation loss {le['val_loss']:.4f} vs {co['val_loss']:.4f}).")


# ----------------------------------------------------------------------------- output


def table(res: dict[str, Any]) -> str:
    le, co, ini = res["learned"], res["best_constant"], res["initial_constant"]
    rows = [
        (f"initial constant η={ini['lr']:.3g}, μ={ini['momentum']:.2f}", ini, 1, None),
        (f"best constant η={co['lr']:.3g}, μ={co['momentum']:.2f} (grid of {co['grid_size']})", co,
         co["training_run_equivalents"], co["seconds"]),
        (f"learned schedule ({le['hyperparameters']} hparams, best of {res['config']['steps']} outer steps)", le,
         le["training_run_equivalents"], le["seconds"]),
    ]
    width = max(len(r[0]) for r in rows)
    head = (f"{'':<{width}}  {'train loss':>10} {'val loss':>9} {'test loss':>9} {'test acc':>8}  "
            f"{'runs':>5} {'seconds':>8}")
    lines = [head, "-" * len(head)]
    for name, r, runs, s in rows:
        lines.append(f"{name:<{width}}  {r['train_loss']:>10.4f} {r['val_loss']:>9.4f} {r['test_loss']:>9.4f} "
                     f"{r['test_acc']:>8.3f}  {runs:>5} {'-' if s is None else f'{s:.1f}':>8}")
    lines.append("(runs: compute in training-run equivalents; a hypergradient counts 1 + 2K)")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Learned η_t and μ_t against step with the best constant; train / validation loss curves."""
    fig, (ax1, ax2, ax3) = _runs.figure(ncols=3, size=(15, 4.2))
    T = res["config"]["train_steps"]
    steps = list(range(T))
    le, co = res["learned"], res["best_constant"]
    ax1.plot(steps, le["lr"], label="learned η_t")
    ax1.plot(steps, [co["lr"]] * T, "--", label=f"best constant η = {co['lr']:.3g}")
    ax1.set_yscale("log")
    ax1.set(xlabel="SGD step t", ylabel="learning rate", title="Learning-rate schedule")
    ax1.legend(fontsize=8)
    ax2.plot(steps, le["momentum"], label="learned μ_t")
    ax2.plot(steps, [co["momentum"]] * T, "--", label=f"best constant μ = {co['momentum']:.2f}")
    ax2.set(xlabel="SGD step t", ylabel="momentum", title="Momentum schedule", ylim=(0, 1))
    ax2.legend(fontsize=8)
    cur = res["curves"]
    for name, label, color in (("learned", "learned", _runs.PALETTE[0]),
                               ("best_constant", "best constant", _runs.PALETTE[1])):
        c = cur[name]
        ax3.plot(c["step"], c["train_loss"], color=color, label=f"{label}: train")
        ax3.plot(c["step"], c["val_loss"], "--", color=color, label=f"{label}: validation")
    ax3.set_yscale("log")
    ax3.set(xlabel="SGD step t", ylabel="cross-entropy", title="Training curves")
    ax3.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = _runs.job_parser("bilevel run lr-schedule",
                         "Learning-rate and momentum schedule of an MLP by forward-mode hypergradients "
                         "vs the best constant rate.", "runs/lr-schedule", device=True, checkpoint_every=True)
    p.add_argument("--steps", type=int, default=None, help=f"outer steps (default {Config.steps})")
    p.add_argument("--train-steps", type=int, default=None, help=f"SGD steps T per run (default {Config.train_steps})")
    p.add_argument("--knots", type=int, default=None, help=f"knots K per schedule (default {Config.knots})")
    p.add_argument("--dataset", choices=_data.DATASETS, default="digits", help="image data (default digits)")
    p.add_argument("--data-dir", default=None, help="folder of the MNIST / Fashion-MNIST IDX files")
    p.add_argument("--n-train", type=int, default=None, help=f"training images (default {Config.n_train})")
    p.add_argument("--n-val", type=int, default=None, help=f"validation images (default {Config.n_val})")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    kw = _runs.config_kwargs(args, QUICK, {"steps": 1, "train_steps": 2, "knots": 2, "n_train": 1, "n_val": 1})
    cfg = Config(**kw, dataset=args.dataset, data_dir=args.data_dir)
    if cfg.train_steps % cfg.block:
        cfg = dataclasses.replace(cfg, block=math.gcd(cfg.train_steps, cfg.block))
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    device = _runs.resolve_device(args.device)
    out = Path(args.out)
    with _runs.one_thread():  # a small network: one thread is fastest
        res = run(cfg, out, resume=args.resume, show=not args.no_progress, device=device,
                  every=args.checkpoint_every)
    d, tm = res["data"], res["timings"]
    print(f"{d['dataset']}: train/val/test = {d['n_train']}/{d['n_val']}/{d['n_test']}; MLP {d['features']}-"
          f"{cfg.hidden}-10, T = {cfg.train_steps} SGD steps of batch {cfg.batch}")
    print(table(res))
    print(f"one training run {tm['training_run_seconds']:.2f}s; one forward-mode hypergradient "
          f"{tm['hypergradient_seconds_mean']:.2f}s = {tm['hypergradient_over_training_run']:.1f} runs measured "
          f"({tm['counted_hypergradient_over_training_run']} counted)")
    print(f"total {tm['total_seconds']:.1f}s; wrote {out / 'results.json'} and {out / 'lr_schedule.png'}")
    print("verdict:", res["verdict"])
    return 0

"""Data hyper-cleaning: learn one weight per training example so that a model trained on
noisy labels fits a small clean validation set (Franceschi, Donini, Frasconi, Pontil,
ICML 2017; the benchmark of hypertorch, BOME and benchopt's bilevel suite).

Data: a fraction ``noise`` (default 50%) of the training labels is replaced by a different
class drawn uniformly at random; the validation set is clean and small.  Digits
(scikit-learn's, default): 1000 train / 300 validation / 497 test, split with ``seed``.
MNIST / Fashion-MNIST (local IDX files): 5000 train / 5000 validation drawn from the
official training set, tested on the official test set.

Inner problem, one hyperparameter ``λᵢ`` per training example, weight ``σ(λᵢ)``::

    w(λ) = argmin_w  g(w, λ) = Σᵢ σ(λᵢ) CE(w; xᵢ, ỹᵢ) / Σᵢ σ(λᵢ) + (l2/2) ‖w‖²

(normalised by the total weight, so that down-weighting examples does not strengthen the
L2 term; the oracle below is then the same problem with 0/1 weights).  Outer problem:
``min_λ F(λ) = CE_val(w(λ))`` by Adam on ``λ``, the hypergradient from
:func:`bilevel.hypergrad` in the optimality form, ``H v = ∇_w F`` solved by conjugate
gradient (``H = ∇²_w g``), ``∇F = −(∂²_{λw} g)ᵀ v`` (the influence of each example).  The
inner solve is L-BFGS (:func:`bilevel.lbfgs`), warm-started from the previous outer step,
as is CG from the previous ``v``.

``--model linear`` (default): multinomial logistic regression; ``g`` is strongly convex
(L2 on every parameter, biases too: softmax is shift-invariant, so without it ``H`` would be
singular along the bias direction), and AID with CG is exact up to the solver tolerances.

``--model mlp``: one hidden tanh layer.  ``g`` is not convex; L-BFGS, warm-started from
the previous outer step, follows one local minimum ``w(λ)``.  Wherever ``H`` is
nonsingular the implicit function theorem gives the derivative of that branch, so AID is
still the right hypergradient (no truncation bias, unlike truncated ITD, and O(|w|)
memory); the linear system is solved by MINRES, which needs ``H`` symmetric but not
definite (at an inexact minimum of a non-convex ``g``, CG can meet negative curvature).
The tests check the MLP's hypergradient against finite differences of the re-solved
inner problem.

Table (test accuracy): trained on the noisy labels with uniform weights; trained on the
clean validation set only; hyper-cleaned (retrained from scratch with the learned
weights); the oracle, trained on the clean subset of the training set.  Flagging: an
example whose learned weight is below 0.5 is called corrupted; precision, recall and F1
against the true corruption mask.

    bilevel run hyperclean [--dataset digits|mnist|fashion-mnist] [--data-dir DIR]
        [--model linear|mlp] [--steps N] [--out runs/hyperclean] [--seed S] [--resume] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import bilevel
from bilevel.apps import _data, _runs

Params = tuple[torch.Tensor, ...]  # linear: (W, b); mlp: (W1, b1, W2, b2)
DTYPE = torch.float64
# (n_train, n_val) when the Config leaves them at 0
DEFAULT_SIZES = {"digits": (1000, 300), "mnist": (5000, 5000), "fashion-mnist": (5000, 5000)}


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``."""

    dataset: str = "digits"  # digits | mnist | fashion-mnist
    data_dir: str | None = None  # where the IDX files are (None: the usual places)
    model: str = "linear"  # linear | mlp
    n_train: int = 0  # 0: the dataset's default (DEFAULT_SIZES)
    n_val: int = 0
    n_test: int = 0  # 0: all the rest of digits / the whole official test set
    noise: float = 0.5  # fraction of training labels replaced by another class
    hidden: int = 64  # MLP hidden units
    steps: int = 30  # outer (Adam) steps
    seed: int = 0
    lr: float = 0.3  # Adam on the logits λ
    lam0: float = 0.0  # initial logit of every weight (σ(0) = 0.5)
    l2: float = 1e-2
    inner_maxiter: int = 500  # L-BFGS iterations per inner solve
    inner_tol: float = 1e-6  # L-BFGS: ‖∇_w g‖ ≤ inner_tol (warm started, so in effect absolute)
    cg_maxiter: int = 500
    cg_tol: float = 1e-8  # relative residual of H v = ∇_w F
    threshold: float = 0.5  # weight below it: flagged as corrupted


QUICK = {"n_train": 120, "n_val": 60, "n_test": 200, "steps": 4, "hidden": 8, "inner_maxiter": 200}
CHECKPOINT_KEYS = ("step", "lam", "params", "v", "adam", "history")
HISTORY_KEYS = (
    "outer_loss", "val_acc", "test_acc", "precision", "recall", "f1", "hypergrad_norm", "cg_iterations",
    "cg_residual", "inner_evals", "inner_grad_norm", "inner_seconds", "hypergrad_seconds",
)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    X_train: torch.Tensor
    y_train: torch.Tensor  # the noisy labels the model sees
    y_true: torch.Tensor  # the labels before corruption (used only to score)
    corrupted: torch.Tensor  # bool, per training example
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    shape: tuple[int, int]
    source: str


def sizes(cfg: Config) -> tuple[int, int]:
    n_train, n_val = DEFAULT_SIZES[cfg.dataset]
    return cfg.n_train or n_train, cfg.n_val or n_val


def load_data(cfg: Config, device: torch.device | str = "cpu") -> Data:
    """The split of ``cfg.dataset`` and the corrupted labels, all drawn with ``cfg.seed`` (on
    the CPU), then moved to ``device``."""
    images = _data.load_images(cfg.dataset, cfg.data_dir)
    n_train, n_val = sizes(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.dataset == "digits":  # one pool of 1797, shuffled and cut in three
        X, y = torch.cat([images.X_train, images.X_test]), torch.cat([images.y_train, images.y_test])
        pool, X_test, y_test = len(y), None, None
    else:  # train and validation from the official training set, test from the official test set
        X, y = images.X_train, images.y_train
        pool, X_test, y_test = len(y), images.X_test, images.y_test
    need = n_train + n_val + (1 if X_test is None else 0)
    if need > pool:
        raise _runs.UserError(f"--n-train {n_train} + --n-val {n_val} leave no test set among the {pool} "
                              f"{cfg.dataset} images: pass smaller sizes")
    perm = torch.randperm(pool, generator=gen)
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    if X_test is None:
        te = perm[n_train + n_val :]
        X_test, y_test = X[te], y[te]
    if cfg.n_test:
        keep = torch.randperm(len(y_test), generator=gen)[: cfg.n_test]
        X_test, y_test = X_test[keep], y_test[keep]
    n_classes = int(y.max()) + 1
    y_true = y[tr]
    corrupted = torch.rand(n_train, generator=gen) < cfg.noise
    # a different class, uniformly: add 1 … C−1 modulo C
    shift = torch.randint(1, n_classes, (n_train,), generator=gen)
    y_noisy = torch.where(corrupted, (y_true + shift) % n_classes, y_true)
    fl, to = (lambda t: t.to(device, DTYPE)), (lambda t: t.to(device))
    return Data(fl(X[tr]), to(y_noisy), to(y_true), to(corrupted), fl(X[va]), to(y[va]), fl(X_test), to(y_test),
                n_classes, images.shape, images.source)


# ----------------------------------------------------------------------------- the model and the problem


def init_params(data: Data, cfg: Config) -> Params:
    """Zeros for the linear model; for the MLP a seeded draw (scale 1/√fan-in), zero biases."""
    d, c, dev = data.X_train.shape[1], data.n_classes, data.X_train.device
    if cfg.model == "linear":
        return torch.zeros(d, c, dtype=DTYPE, device=dev), torch.zeros(c, dtype=DTYPE, device=dev)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # drawn on the CPU: the same numbers on every device
    W1 = torch.randn(d, cfg.hidden, generator=gen, dtype=DTYPE) / math.sqrt(d)
    W2 = torch.randn(cfg.hidden, c, generator=gen, dtype=DTYPE) / math.sqrt(cfg.hidden)
    params = W1, torch.zeros(cfg.hidden, dtype=DTYPE), W2, torch.zeros(c, dtype=DTYPE)
    return tuple(p.to(dev) for p in params)


def logits(params: Params, X: torch.Tensor) -> torch.Tensor:
    if len(params) == 2:
        W, b = params
        return X @ W + b
    W1, b1, W2, b2 = params
    return torch.tanh(X @ W1 + b1) @ W2 + b2


def weighted_loss(params: Params, X: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, l2: float) -> torch.Tensor:
    """``Σ wᵢ CEᵢ / Σ wᵢ + (l2/2)‖params‖²``: the inner objective, and every baseline's."""
    ce = F.cross_entropy(logits(params, X), y, reduction="none")
    return (weights * ce).sum() / weights.sum() + 0.5 * l2 * sum((p * p).sum() for p in params)


def make_losses(data: Data, cfg: Config) -> tuple[Any, Any]:
    """``inner_loss(params, λ)`` (weighted training CE + L2) and ``outer_loss`` (validation CE)."""

    def inner_loss(params: Params, lam: torch.Tensor) -> torch.Tensor:
        return weighted_loss(params, data.X_train, data.y_train, torch.sigmoid(lam), cfg.l2)

    def outer_loss(params: Params, lam: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits(params, data.X_val), data.y_val)

    return inner_loss, outer_loss


def accuracy(params: Params, X: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits(params, X).argmax(1) == y).to(DTYPE).mean())


def solve_inner(inner_loss: Any, params: Params, lam: torch.Tensor, cfg: Config,
                maxiter: int | None = None) -> tuple[Params, bilevel.MinimizeInfo]:
    return bilevel.lbfgs(inner_loss, params, lam.detach(), maxiter=maxiter or cfg.inner_maxiter,
                         tol=cfg.inner_tol, history=20)


def job_hypergrad(data: Data, params: Params, lam: torch.Tensor, cfg: Config,
                  init: Any = None) -> tuple[torch.Tensor, bilevel.HypergradInfo]:
    """``∇F(λ)`` at ``params ≈ w(λ)``: AID, optimality form, ``H v = ∇_w F`` by CG (linear
    model) or MINRES (MLP)."""
    inner_loss, outer_loss = make_losses(data, cfg)
    solver = bilevel.CG if cfg.model == "linear" else bilevel.MINRES  # the MLP's H need not be definite
    return bilevel.hypergrad(outer_loss, params, lam.detach(), inner_loss=inner_loss,
                             solver=solver(maxiter=cfg.cg_maxiter, tol=cfg.cg_tol), init=init, return_info=True)


def flagging(weights: torch.Tensor, corrupted: torch.Tensor, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of calling ``weight < threshold`` corrupted."""
    flagged = weights < threshold
    tp = int((flagged & corrupted).sum())
    precision = tp / max(1, int(flagged.sum()))
    recall = tp / max(1, int(corrupted.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": int(flagged.sum()),
            "corrupted": int(corrupted.sum())}


# ----------------------------------------------------------------------------- the runs


def fit(data: Data, cfg: Config, X: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> dict[str, Any]:
    """Train the model from its initial parameters on ``(X, y)`` with example ``weights``;
    its test and validation accuracy."""
    t0 = time.perf_counter()
    loss = lambda params, w: weighted_loss(params, X, y, w, cfg.l2)
    params, info = bilevel.lbfgs(loss, init_params(data, cfg), weights, maxiter=4 * cfg.inner_maxiter,
                                 tol=cfg.inner_tol, history=20)
    return {"test_acc": accuracy(params, data.X_test, data.y_test), "val_acc": accuracy(params, data.X_val, data.y_val),
            "n_examples": int((weights > 0).sum()), "inner_grad_norm": float(info.grad_norm),
            "seconds": time.perf_counter() - t0}


def baselines(data: Data, cfg: Config, weights: torch.Tensor) -> dict[str, dict[str, Any]]:
    ones = lambda n: torch.ones(n, dtype=DTYPE, device=data.X_train.device)
    clean = ~data.corrupted
    return {
        "noisy": fit(data, cfg, data.X_train, data.y_train, ones(len(data.y_train))),
        "val_only": fit(data, cfg, data.X_val, data.y_val, ones(len(data.y_val))),
        "hyperclean": fit(data, cfg, data.X_train, data.y_train, weights),
        "oracle": fit(data, cfg, data.X_train[clean], data.y_train[clean], ones(int(clean.sum()))),
    }


def _fresh_state(data: Data, cfg: Config) -> dict[str, Any]:
    return {"config": dataclasses.asdict(cfg), "step": 0,
            "lam": torch.full((len(data.y_train),), cfg.lam0, dtype=DTYPE, device=data.X_train.device),
            "params": init_params(data, cfg), "v": None, "adam": None,
            "history": {k: [] for k in HISTORY_KEYS}}


def learn_weights(data: Data, cfg: Config, ckpt: Path, *, saved: dict[str, Any] | None = None, every: int = 1,
                  show: bool = True) -> dict[str, Any]:
    """Adam on λ with AID hypergradients for ``cfg.steps`` outer steps, from the checked state
    ``saved`` if given; checkpoints every ``every`` steps."""
    state = _fresh_state(data, cfg) if saved is None else saved
    inner_loss, _ = make_losses(data, cfg)
    lam = state["lam"].clone()
    opt = torch.optim.Adam([lam], lr=cfg.lr)
    if state["adam"] is not None:
        opt.load_state_dict(state["adam"])
    hist = state["history"]

    def save(st: dict[str, Any]) -> None:
        st.update(lam=lam.detach().clone(), adam=opt.state_dict())
        _runs.save_checkpoint(ckpt, st)

    for step in _runs.steps(cfg.steps, state, save, every=every, show=show):
        t0 = time.perf_counter()
        # the first solve starts cold (from the initial parameters): give it more iterations
        params, info = solve_inner(inner_loss, state["params"], lam, cfg, (5 if step == 0 else 1) * cfg.inner_maxiter)
        t1 = time.perf_counter()
        hg, hinfo = job_hypergrad(data, params, lam, cfg, init=state["v"])
        t2 = time.perf_counter()
        state["params"], state["v"] = params, hinfo.v
        flags = flagging(torch.sigmoid(lam.detach()), data.corrupted, cfg.threshold)
        row = {
            "outer_loss": float(hinfo.outer_loss), "val_acc": accuracy(params, data.X_val, data.y_val),
            "test_acc": accuracy(params, data.X_test, data.y_test),  # watched, never used
            "precision": flags["precision"], "recall": flags["recall"], "f1": flags["f1"],
            "hypergrad_norm": float(hg.norm()), "cg_iterations": int(hinfo.iterations),
            "cg_residual": float(hinfo.residual), "inner_evals": int(info.evaluations),
            "inner_grad_norm": float(info.grad_norm), "inner_seconds": t1 - t0, "hypergrad_seconds": t2 - t1,
        }
        for k in HISTORY_KEYS:
            hist[k].append(row[k])
        lam.grad = hg  # the job's own tensor: Adam reads .grad
        opt.step()
        lam.grad = None
    return {"lam": lam.detach(), "history": hist}


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True, every: int = 1,
        device: torch.device | str = "cpu") -> dict[str, Any]:
    """The whole job: learned weights, the four trained models, ``results.json`` and
    ``hyperclean.png`` in ``out``."""
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=CHECKPOINT_KEYS, grow={"steps": "step"})
    t_start = time.perf_counter()
    data = load_data(cfg, device)
    t0 = time.perf_counter()
    learned = learn_weights(data, cfg, out / _runs.CHECKPOINT, saved=saved, every=every, show=show)
    t_learn = time.perf_counter() - t0
    lam = learned["lam"].cpu()
    weights = torch.sigmoid(lam)
    models = baselines(data, cfg, weights.to(data.X_train.device))
    hist = learned["history"]
    corrupted = data.corrupted.cpu()
    w_clean, w_bad = weights[~corrupted], weights[corrupted]
    results = {
        "config": dataclasses.asdict(cfg),
        "data": {"dataset": cfg.dataset, "source": data.source, "n_train": len(data.y_train),
                 "n_val": len(data.y_val), "n_test": len(data.y_test), "n_corrupted": int(data.corrupted.sum()),
                 "n_hparams": len(lam), "n_params": sum(p.numel() for p in init_params(data, cfg))},
        "test_accuracy": {k: m["test_acc"] for k, m in models.items()},
        "models": models,
        "flagging": flagging(weights, corrupted, cfg.threshold),
        "weights": {"median_clean": float(w_clean.median()), "median_corrupted": float(w_bad.median()),
                    "lam": lam.tolist(), "corrupted": corrupted.tolist()},
        "scales": {"lam": "logit", "weights": "linear (σ of lam)"},
        "history": hist,
        "hypergrad": {"solver": f"{'CG' if cfg.model == 'linear' else 'MINRES'}(maxiter={cfg.cg_maxiter}, "
                                f"tol={cfg.cg_tol})",
                      "max_cg_residual": max(hist["cg_residual"]), "cg_iterations": sum(hist["cg_iterations"]),
                      "max_inner_grad_norm": max(hist["inner_grad_norm"])},
        "timings": {"learn_seconds": t_learn, "inner_seconds": sum(hist["inner_seconds"]),
                    "hypergrad_seconds": sum(hist["hypergrad_seconds"]),
                    "baselines_seconds": sum(m["seconds"] for m in models.values()),
                    "threads": torch.get_num_threads()},
    }
    results["gap_to_oracle"] = models["oracle"]["test_acc"] - models["hyperclean"]["test_acc"]
    results["timings"]["total_seconds"] = time.perf_counter() - t_start
    plot(results, out / "hyperclean.png")
    _runs.write_json(out / "results.json", results)
    return results


# ----------------------------------------------------------------------------- output

ROWS = (("noisy", "trained on noisy labels (uniform weights)"), ("val_only", "trained on the validation set only"),
        ("hyperclean", "hyper-cleaned (retrained, learned weights)"), ("oracle", "oracle (clean subset only)"))


def table(results: dict[str, Any]) -> str:
    width = max(len(name) for _, name in ROWS)
    lines = [f"{'':<{width}}  {'examples':>8} {'test acc':>8}", "-" * (width + 19)]
    for key, name in ROWS:
        m = results["models"][key]
        lines.append(f"{name:<{width}}  {m['n_examples']:>8d} {m['test_acc']:>8.4f}")
    f = results["flagging"]
    lines.append(f"flagging corrupted (weight < {results['config']['threshold']}): precision {f['precision']:.3f}, "
                 f"recall {f['recall']:.3f}, F1 {f['f1']:.3f} ({f['flagged']} flagged, {f['corrupted']} corrupted)")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Histogram of the learned weights, clean vs corrupted; outer loss and F1 per step."""
    fig, (ax1, ax2) = _runs.figure(ncols=2, size=(11, 4))
    lam = torch.tensor(results["weights"]["lam"])
    bad = torch.tensor(results["weights"]["corrupted"])
    w = torch.sigmoid(lam)
    bins = torch.linspace(0, 1, 41).tolist()
    ax1.hist(w[~bad].tolist(), bins=bins, alpha=0.75, color=_runs.PALETTE[0], label=f"clean ({int((~bad).sum())})")
    ax1.hist(w[bad].tolist(), bins=bins, alpha=0.75, color=_runs.PALETTE[1], label=f"corrupted ({int(bad.sum())})")
    ax1.axvline(results["config"]["threshold"], color=_runs.PALETTE[7], ls=":", label="threshold")
    ax1.set(xlabel="learned weight σ(λ)", ylabel="training examples", title="Learned example weights")
    ax1.legend(fontsize=8)
    hist = results["history"]
    steps = range(1, len(hist["outer_loss"]) + 1)
    ax2.plot(steps, hist["outer_loss"], color=_runs.PALETTE[0], label="validation CE (outer loss)")
    ax2.set(xlabel="outer step", ylabel="validation cross-entropy", title="Outer loss and flagging F1")
    twin = ax2.twinx()
    twin.plot(steps, hist["f1"], color=_runs.PALETTE[2], ls="--", label="F1 of flagging")
    twin.set(ylabel="F1", ylim=(0, 1))
    lines = ax2.get_lines() + twin.get_lines()
    ax2.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="center right")
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = _runs.job_parser("bilevel run hyperclean",
                         "Data hyper-cleaning: one learned weight per training example, 50% noisy labels.",
                         "runs/hyperclean", device=True, checkpoint_every=True)
    p.add_argument("--dataset", choices=_data.DATASETS, default=None, help="digits (default), mnist, fashion-mnist")
    p.add_argument("--data-dir", default=None, help="folder of the MNIST / Fashion-MNIST IDX files")
    p.add_argument("--model", choices=("linear", "mlp"), default=None, help="linear (default) or mlp")
    p.add_argument("--steps", type=int, default=None, help=f"outer steps (default {Config.steps})")
    p.add_argument("--n-train", type=int, default=None, dest="n_train",
                   help="training examples (default 1000 on digits, 5000 otherwise)")
    p.add_argument("--n-val", type=int, default=None, dest="n_val",
                   help="validation examples (default 300 on digits, 5000 otherwise)")
    p.add_argument("--n-test", type=int, default=None, dest="n_test", help="test examples (default all)")
    p.add_argument("--noise", type=float, default=None, help=f"fraction of flipped labels (default {Config.noise})")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    kw = _runs.config_kwargs(args, QUICK, {"steps": 1, "n_train": 2, "n_val": 2, "n_test": 1})
    for name in ("dataset", "data_dir", "model"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.noise is not None:
        if not 0.0 <= args.noise < 1.0:
            raise _runs.UserError(f"--noise should be in [0, 1), not {args.noise}")
        kw["noise"] = args.noise
    return Config(**kw)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    device = _runs.resolve_device(args.device)
    out = Path(args.out)
    # digits is small: one thread is fastest; the 28×28 sets use torch's threads
    with _runs.one_thread() if cfg.dataset == "digits" else contextlib.nullcontext():
        res = run(cfg, out, resume=args.resume, show=not args.no_progress, every=args.checkpoint_every,
                  device=device)
    d, t = res["data"], res["timings"]
    print(f"{d['dataset']} ({cfg.model}): train/val/test = {d['n_train']}/{d['n_val']}/{d['n_test']}, "
          f"{d['n_corrupted']} training labels corrupted, {d['n_hparams']} hyperparameters")
    print(table(res))
    gap = 100 * res["gap_to_oracle"]
    print(f"hyper-cleaned is {abs(gap):.1f} points {'below' if gap > 0 else 'above'} the oracle; "
          f"time {t['learn_seconds']:.1f}s learning weights, {t['total_seconds']:.1f}s in all")
    print(f"wrote {out / 'results.json'} and {out / 'hyperclean.png'}")
    return 0

"""Data poisoning of logistic regression: optimise the pixels of a few training points, added
to the training set with wrong labels, to make the trained model as bad as possible on
validation data (Biggio, Nelson, Laskov, ICML 2012; Muñoz-González et al., AISec 2017;
Mei & Zhu, AAAI 2015, for the bilevel view).

Data: scikit-learn's 8×8 digits, all 10 classes, pixels scaled to [0, 1]; a seeded split
300 train / 300 validation / 1197 test.  The attacker adds ``n_poison`` points (default 15,
4.8% of the poisoned training set).  Each starts as a copy of a random training image
with its label changed to another class drawn at random; the labels stay fixed, the pixels
``P`` are optimised inside the data range ``[0, 1]``.

Inner problem (multinomial logistic regression on the poisoned training set)::

    w(P) = argmin_w  g(w, P) = CE([X_train; P], [y_train; y_P]) + (l2/2)‖w‖²

strongly convex in ``w`` (L2 on every parameter), solved by L-BFGS warm-started from the
previous outer step.  Outer problem: ``max_{P ∈ [0,1]} F(P) = CE_val(w(P))`` by projected
gradient ascent ``P ← clip(P + η ∇F/‖∇F‖_∞, 0, 1)`` (each step moves the most sensitive
pixel by ``η``), the hypergradient ``∇F(P)`` from :func:`bilevel.hypergrad` (optimality
form, CG on ``H v = ∇_w F``: exact up to the solver tolerances, ``H`` being positive
definite), warm-started from the previous ``v``.

Reported test accuracy: clean (no poison); (a) random label flips at the same budget —
``n_poison`` copies of random training images with random wrong labels (the attack's
starting points are one such draw); (b) ``n_poison`` uniform random points in the box
with random labels; (c) the optimised poison.  (a) and (b) are averaged over ``draws``
draws.

    bilevel run poison [--steps N] [--n-poison K] [--out runs/poison] [--seed S] [--resume] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import bilevel
from bilevel.apps import _data, _runs
from bilevel.apps.ho_digits import accuracy, cross_entropy  # the same linear softmax model

Params = tuple[torch.Tensor, torch.Tensor]  # (W: d × classes, b: classes)
DTYPE = torch.float64
BOX = (0.0, 1.0)  # the data range of the pixels


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``."""

    steps: int = 40  # outer (projected ascent) steps
    seed: int = 0
    n_train: int = 300
    n_val: int = 300  # the rest of the 1797 digits is the test set
    n_poison: int = 15
    lr: float = 0.1  # largest pixel change per step (pixels are in [0, 1])
    l2: float = 1e-3
    inner_maxiter: int = 500  # L-BFGS iterations per inner solve
    inner_tol: float = 1e-8  # L-BFGS: ‖∇_w g‖ ≤ inner_tol (warm started, so in effect absolute)
    cg_maxiter: int = 300
    cg_tol: float = 1e-8  # relative residual of H v = ∇_w F
    draws: int = 5  # random draws of each baseline


QUICK = {"steps": 4, "n_train": 100, "n_val": 100, "n_poison": 5, "draws": 2, "inner_maxiter": 200}
CHECKPOINT_KEYS = ("step", "poison", "params", "v", "history")
HISTORY_KEYS = ("val_loss", "val_acc", "test_acc", "hypergrad_norm", "cg_iterations", "cg_residual",
                "inner_evals", "inner_grad_norm", "inner_seconds", "hypergrad_seconds")


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Data(_data.Split):
    start: torch.Tensor  # the poisoned points' starting pixels (copies of training images)
    y_poison: torch.Tensor  # their (wrong) labels, fixed
    source_index: torch.Tensor  # which training image each started from
    n_classes: int


def flipped(y: torch.Tensor, n_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Another class for each label, uniformly among the other ``n_classes − 1``."""
    return (y + torch.randint(1, n_classes, y.shape, generator=gen)) % n_classes


def load_data(cfg: Config, device: torch.device | str = "cpu") -> Data:
    """Digits in [0, 1], split with ``cfg.seed``, and the poison's starting points."""
    images = _data.load_images("digits")
    X, y = torch.cat([images.X_train, images.X_test]).to(DTYPE), torch.cat([images.y_train, images.y_test])
    if cfg.n_train + cfg.n_val >= len(y):
        raise _runs.UserError(f"--n-train {cfg.n_train} + --n-val {cfg.n_val} leave no test set among the "
                              f"{len(y)} digits: pass smaller sizes")
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(y), generator=gen)
    tr, va, te = perm[: cfg.n_train], perm[cfg.n_train : cfg.n_train + cfg.n_val], perm[cfg.n_train + cfg.n_val :]
    n_classes = int(y.max()) + 1
    source = torch.randint(0, cfg.n_train, (cfg.n_poison,), generator=gen)
    y_poison = flipped(y[tr][source], n_classes, gen)
    to = lambda t: t.to(device)
    return Data(to(X[tr]), to(y[tr]), to(X[va]), to(y[va]), to(X[te]), to(y[te]), to(X[tr][source].clone()),
                to(y_poison), source, n_classes)


# ----------------------------------------------------------------------------- the problem


def init_params(data: Data) -> Params:
    d, c, dev = data.X_train.shape[1], data.n_classes, data.X_train.device
    return torch.zeros(d, c, dtype=DTYPE, device=dev), torch.zeros(c, dtype=DTYPE, device=dev)


def make_losses(data: Data, cfg: Config, y_poison: torch.Tensor | None = None) -> tuple[Any, Any]:
    """``inner_loss(params, P)``: training CE on the training set plus the points ``P`` (labels
    ``y_poison``, default the attack's), + L2; ``outer_loss``: validation CE."""
    y_all = torch.cat([data.y_train, data.y_poison if y_poison is None else y_poison])

    def inner_loss(params: Params, poison: torch.Tensor) -> torch.Tensor:
        W, b = params
        return cross_entropy(params, torch.cat([data.X_train, poison]), y_all) + 0.5 * cfg.l2 * ((W * W).sum()
                                                                                                 + (b * b).sum())

    def outer_loss(params: Params, poison: torch.Tensor) -> torch.Tensor:
        return cross_entropy(params, data.X_val, data.y_val)

    return inner_loss, outer_loss


def solve_inner(inner_loss: Any, params: Params, poison: torch.Tensor, cfg: Config,
                maxiter: int | None = None) -> tuple[Params, bilevel.MinimizeInfo]:
    return bilevel.lbfgs(inner_loss, params, poison.detach(), maxiter=maxiter or cfg.inner_maxiter,
                         tol=cfg.inner_tol, history=20)


def job_hypergrad(data: Data, params: Params, poison: torch.Tensor, cfg: Config,
                  init: Any = None) -> tuple[torch.Tensor, bilevel.HypergradInfo]:
    """``∇F(P)`` at ``params ≈ w(P)``: AID, optimality form, CG on ``H v = ∇_w F``."""
    inner_loss, outer_loss = make_losses(data, cfg)
    return bilevel.hypergrad(outer_loss, params, poison.detach(), inner_loss=inner_loss,
                             solver=bilevel.CG(maxiter=cfg.cg_maxiter, tol=cfg.cg_tol), init=init,
                             return_info=True)


def ascent_step(poison: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """``clip(P + lr ∇F/‖∇F‖_∞, box)``: the most sensitive pixel moves by ``lr``."""
    scale = grad.abs().max()
    step = grad / scale if scale > 0 else grad
    return (poison + lr * step).clamp(*BOX)


def trained(data: Data, cfg: Config, poison: torch.Tensor | None, y_poison: torch.Tensor | None) -> dict[str, float]:
    """Test and validation accuracy of the model trained from scratch on the training set plus
    ``poison`` (labels ``y_poison``); ``None``: the clean training set."""
    if poison is None:
        poison, y_poison = data.X_train[:0], data.y_train[:0]
    inner_loss, _ = make_losses(data, cfg, y_poison)
    params, info = solve_inner(inner_loss, init_params(data), poison, cfg, maxiter=4 * cfg.inner_maxiter)
    return {"test_acc": accuracy(params, data.X_test, data.y_test), "val_acc": accuracy(params, data.X_val, data.y_val),
            "val_loss": float(cross_entropy(params, data.X_val, data.y_val)), "inner_grad_norm": float(info.grad_norm)}


def random_baselines(data: Data, cfg: Config) -> dict[str, Any]:
    """(a) label flips: copies of random training images with random wrong labels; (b) uniform
    random points in the box with random labels; ``cfg.draws`` draws each, seeded by ``(seed, draw)``."""
    rows: dict[str, list[dict[str, float]]] = {"label_flips": [], "random_points": []}
    n, d, dev = cfg.n_poison, data.X_train.shape[1], data.X_train.device
    for draw in range(cfg.draws):
        gen = torch.Generator().manual_seed(1_000_003 * cfg.seed + draw + 1)
        src = torch.randint(0, len(data.y_train), (n,), generator=gen).to(dev)
        y_flip = flipped(data.y_train[src].cpu(), data.n_classes, gen).to(dev)
        rows["label_flips"].append(trained(data, cfg, data.X_train[src], y_flip))
        points = (BOX[0] + (BOX[1] - BOX[0]) * torch.rand(n, d, generator=gen, dtype=DTYPE)).to(dev)
        labels = torch.randint(0, data.n_classes, (n,), generator=gen).to(dev)
        rows["random_points"].append(trained(data, cfg, points, labels))
    summary = lambda xs: {"test_acc_mean": statistics.fmean(r["test_acc"] for r in xs),
                          "test_acc_std": statistics.pstdev(r["test_acc"] for r in xs), "draws": xs}
    return {k: summary(v) for k, v in rows.items()}


def _fresh_state(data: Data) -> dict[str, Any]:
    return {"step": 0, "poison": data.start.clone(), "params": init_params(data), "v": None,
            "history": {k: [] for k in HISTORY_KEYS}}


def attack(data: Data, cfg: Config, ckpt: Path, *, saved: dict[str, Any] | None = None, every: int = 1,
           show: bool = True) -> dict[str, Any]:
    """Projected gradient ascent on the poisoned pixels for ``cfg.steps`` steps, from the
    checked state ``saved`` if given; checkpoints every ``every`` steps."""
    state = {"config": dataclasses.asdict(cfg), **(_fresh_state(data) if saved is None else saved)}
    inner_loss, _ = make_losses(data, cfg)
    hist = state["history"]
    for _ in _runs.steps(cfg.steps, state, lambda st: _runs.save_checkpoint(ckpt, st), every=every, show=show):
        t0 = time.perf_counter()
        params, info = solve_inner(inner_loss, state["params"], state["poison"], cfg)
        t1 = time.perf_counter()
        hg, hinfo = job_hypergrad(data, params, state["poison"], cfg, init=state["v"])
        t2 = time.perf_counter()
        row = {
            "val_loss": float(hinfo.outer_loss), "val_acc": accuracy(params, data.X_val, data.y_val),
            "test_acc": accuracy(params, data.X_test, data.y_test),  # watched, never used
            "hypergrad_norm": float(hg.norm()), "cg_iterations": int(hinfo.iterations),
            "cg_residual": float(hinfo.residual), "inner_evals": int(info.evaluations),
            "inner_grad_norm": float(info.grad_norm), "inner_seconds": t1 - t0, "hypergrad_seconds": t2 - t1,
        }
        for k in HISTORY_KEYS:
            hist[k].append(row[k])
        state.update(params=params, v=hinfo.v, poison=ascent_step(state["poison"], hg, cfg.lr))
    return {"poison": state["poison"], "history": hist}


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True, every: int = 1,
        device: torch.device | str = "cpu") -> dict[str, Any]:
    """The whole job: the attack, the baselines, ``results.json`` and ``poison.png`` in ``out``."""
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=CHECKPOINT_KEYS, grow={"steps": "step"})
    t_start = time.perf_counter()
    data = load_data(cfg, device)
    t0 = time.perf_counter()
    learned = attack(data, cfg, out / _runs.CHECKPOINT, saved=saved, every=every, show=show)
    t_attack = time.perf_counter() - t0
    t0 = time.perf_counter()
    clean = trained(data, cfg, None, None)
    poisoned = trained(data, cfg, learned["poison"], data.y_poison)
    rand = random_baselines(data, cfg)
    t_base = time.perf_counter() - t0
    hist = learned["history"]
    n_total = cfg.n_train + cfg.n_poison
    results = {
        "config": dataclasses.asdict(cfg),
        "data": {"n_train": cfg.n_train, "n_val": cfg.n_val, "n_test": len(data.y_test), "n_poison": cfg.n_poison,
                 "poison_fraction": cfg.n_poison / n_total, "box": BOX},
        "test_accuracy": {"clean": clean["test_acc"], "label_flips": rand["label_flips"]["test_acc_mean"],
                          "random_points": rand["random_points"]["test_acc_mean"], "poison": poisoned["test_acc"]},
        "drop": {"label_flips": clean["test_acc"] - rand["label_flips"]["test_acc_mean"],
                 "random_points": clean["test_acc"] - rand["random_points"]["test_acc_mean"],
                 "poison": clean["test_acc"] - poisoned["test_acc"]},
        "clean": clean, "poisoned": poisoned, "baselines": rand,
        "poison_points": {"start": data.start.cpu(), "final": learned["poison"].cpu(),
                          "labels": data.y_poison.cpu(), "start_labels": data.y_train[data.source_index.to(
                              data.y_train.device)].cpu(), "shape": (8, 8)},
        "scales": {"poison_points": "linear (pixel intensity in [0, 1])"},
        "history": hist,
        "hypergrad": {"solver": f"CG(maxiter={cfg.cg_maxiter}, tol={cfg.cg_tol})",
                      "max_cg_residual": max(hist["cg_residual"]), "cg_iterations": sum(hist["cg_iterations"]),
                      "max_inner_grad_norm": max(hist["inner_grad_norm"])},
        "timings": {"attack_seconds": t_attack, "inner_seconds": sum(hist["inner_seconds"]),
                    "hypergrad_seconds": sum(hist["hypergrad_seconds"]), "baselines_seconds": t_base,
                    "threads": torch.get_num_threads()},
    }
    results["timings"]["total_seconds"] = time.perf_counter() - t_start
    plot(results, out / "poison.png")
    _runs.write_json(out / "results.json", results)
    return results


# ----------------------------------------------------------------------------- output


def table(results: dict[str, Any]) -> str:
    acc, drop, base = results["test_accuracy"], results["drop"], results["baselines"]
    k = results["data"]["n_poison"]
    rows = [("clean (no poison)", acc["clean"], None, ""),
            (f"(a) {k} random label flips", acc["label_flips"], drop["label_flips"],
             f"± {base['label_flips']['test_acc_std']:.4f}"),
            (f"(b) {k} random points in the box", acc["random_points"], drop["random_points"],
             f"± {base['random_points']['test_acc_std']:.4f}"),
            (f"(c) {k} optimised poison points", acc["poison"], drop["poison"], "")]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'test acc':>8}  {'drop':>7}", "-" * (width + 19)]
    for name, a, d, spread in rows:
        lines.append(f"{name:<{width}}  {a:>8.4f}  {'' if d is None else f'{d:>7.4f}'} {spread}".rstrip())
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path, n_show: int = 6) -> None:
    """Test accuracy per ascent step against the baselines; poisoned images vs their starts."""
    fig, (ax1, ax2) = _runs.figure(ncols=2, size=(12, 4))
    hist, acc = results["history"], results["test_accuracy"]
    curve = hist["test_acc"] + [acc["poison"]]  # step k: the model trained with the poison after k steps
    ax1.plot(range(len(curve)), curve, marker=".", color=_runs.PALETTE[3], label="(c) optimised poison")
    for key, name, c, ls in (("clean", "clean", 0, "-"), ("label_flips", "(a) random label flips", 1, "--"),
                             ("random_points", "(b) random points", 2, ":")):
        ax1.axhline(acc[key], color=_runs.PALETTE[c], ls=ls, label=name)
    ax1.set(xlabel="outer step (projected gradient ascent)", ylabel="test accuracy",
            title="Test accuracy while the poison is optimised")
    ax1.legend(fontsize=8)
    pts = results["poison_points"]
    start, final = torch.as_tensor(pts["start"]), torch.as_tensor(pts["final"])
    k, (h, w) = min(n_show, len(final)), pts["shape"]
    canvas = torch.full((2 * h + 1, k * (w + 1) - 1), float("nan"))  # two rows of k images, 1-pixel gaps
    for i in range(k):
        canvas[:h, i * (w + 1) : i * (w + 1) + w] = start[i].reshape(h, w)
        canvas[h + 1 :, i * (w + 1) : i * (w + 1) + w] = final[i].reshape(h, w)
    ax2.imshow(canvas.numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax2.set_xticks([i * (w + 1) + w / 2 - 0.5 for i in range(k)],
                   [f"{int(pts['start_labels'][i])}, labelled {int(pts['labels'][i])}" for i in range(k)], fontsize=8)
    ax2.set_yticks([h / 2 - 0.5, h + h / 2 + 0.5], ["start", "poison"])
    ax2.set_title("Starting images (top) and poison (bottom)")
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = _runs.job_parser("bilevel run poison", "Data poisoning of logistic regression on digits by AID hypergradients.",
                         "runs/poison", device=True, checkpoint_every=True)
    p.add_argument("--steps", type=int, default=None, help=f"outer steps (default {Config.steps})")
    p.add_argument("--n-poison", type=int, default=None, dest="n_poison",
                   help=f"poisoned points added to the training set (default {Config.n_poison})")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(**_runs.config_kwargs(args, QUICK, {"steps": 1, "n_poison": 1}))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    device = _runs.resolve_device(args.device)
    out = Path(args.out)
    with _runs.one_thread():  # a small problem: one thread is fastest
        res = run(cfg, out, resume=args.resume, show=not args.no_progress, every=args.checkpoint_every,
                  device=device)
    d, t = res["data"], res["timings"]
    print(f"digits: train/val/test = {d['n_train']}/{d['n_val']}/{d['n_test']}, {d['n_poison']} points added "
          f"({100 * d['poison_fraction']:.1f}% of the poisoned training set)")
    print(table(res))
    print(f"time {t['attack_seconds']:.1f}s attack ({t['inner_seconds']:.1f}s inner L-BFGS, "
          f"{t['hypergrad_seconds']:.1f}s hypergradients), {t['total_seconds']:.1f}s in all")
    print(f"wrote {out / 'results.json'} and {out / 'poison.png'}")
    return 0

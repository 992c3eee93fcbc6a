"""A deep-equilibrium classifier on scikit-learn's 8×8 digits, trained by implicit gradients.

Model: ``x = Linear(64, h)(pixels/16)``, ``z* = tanh(W̃ z* + x)`` found by Anderson
acceleration (:class:`bilevel.nn.DEQ`), logits ``= Linear(h, 10)(z*)``.  ``W̃ = W ·
min(1, γ/‖W‖₂)`` keeps ``‖W̃‖₂ ≤ γ < 1``, so the cell is a γ-contraction in ``z`` (tanh is
1-Lipschitz) and the fixed point exists and is unique for every input.  The backward pass
solves ``(I − ∂_z f)ᵀ v = ∂L/∂z*`` by GMRES — no graph is kept through the forward
iterations (Bai, Kolter, Koltun, NeurIPS 2019).

At the end the trained model's fixed points on the test set are found to one tolerance
by Anderson and by plain (Picard) iteration, and the iteration counts are reported.

    bilevel run deq-digits [--out runs/deq-digits] [--epochs N] [--seed S] [--resume] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel.apps import _runs
from bilevel.fixed_point_solve import Anderson, Picard, fixed_point_solve
from bilevel.nn import DEQ

DTYPE = torch.float32


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``."""

    epochs: int = 20
    seed: int = 0
    hidden: int = 64
    batch: int = 128
    lr: float = 1e-2
    weight_decay: float = 1e-4
    gamma: float = 0.95  # bound on ‖W̃‖₂: the cell's contraction factor
    n_test: int = 450  # of the 1797 images; the rest trains
    forward: str = "anderson"  # or "picard": the forward solver
    forward_maxiter: int = 60
    forward_tol: float = 1e-4  # relative residual ‖f(z) − z‖/‖f(z)‖
    anderson_memory: int = 5
    backward_maxiter: int = 40
    backward_tol: float = 1e-4  # relative residual of (I − ∂_z f)ᵀ v = ∂L/∂z*
    compare_tol: float = 1e-5  # the tolerance at which Anderson and Picard are compared


QUICK = {"epochs": 2, "hidden": 32, "n_test": 300}


class Cell(nn.Module):
    """``f(z, x) = tanh(W̃ z + x)`` with ``W̃ = W · min(1, γ/‖W‖₂)``: a γ-contraction in ``z``."""

    def __init__(self, hidden: int, gamma: float) -> None:
        super().__init__()
        # starts on the bound (‖W‖₂ ≈ 2 > γ): a slow contraction, where Anderson pays off
        self.weight = nn.Parameter(torch.randn(hidden, hidden, dtype=DTYPE) / hidden**0.5)
        self.gamma = gamma

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # exact spectral norm (an SVD of h × h: cheap at this size); the gradient sees the rescaling
        w = w * torch.clamp(self.gamma / torch.linalg.matrix_norm(w, ord=2), max=1.0)
        return torch.tanh(z @ w.T + x)


class DEQClassifier(nn.Module):
    def __init__(self, cfg: Config, n_features: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        self.encoder = nn.Linear(n_features, cfg.hidden, dtype=DTYPE)
        self.deq = DEQ(
            Cell(cfg.hidden, cfg.gamma),
            solver=forward_solver(cfg),
            backward_solver=bilevel.GMRES(maxiter=cfg.backward_maxiter, tol=cfg.backward_tol),
        )
        self.head = nn.Linear(cfg.hidden, n_classes, dtype=DTYPE)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.encoder(pixels)))


def forward_solver(cfg: Config, name: str | None = None) -> Anderson | Picard:
    name = cfg.forward if name is None else name
    if name == "anderson":
        return Anderson(maxiter=cfg.forward_maxiter, tol=cfg.forward_tol, memory=cfg.anderson_memory)
    if name == "picard":
        return Picard(maxiter=cfg.forward_maxiter, tol=cfg.forward_tol)
    raise ValueError(f"forward should be 'anderson' or 'picard', not {name!r}.")


@dataclass(frozen=True)
class Data:
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


def load_data(cfg: Config) -> Data:
    """Digits scaled to [0, 1], a fixed-seed random train / test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.as_tensor(digits.data, dtype=DTYPE) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    if not 0 < cfg.n_test < len(y):
        raise ValueError(f"n_test should be in (0, {len(y)}), not {cfg.n_test}.")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))
    te, tr = perm[: cfg.n_test], perm[cfg.n_test :]
    return Data(X[tr], y[tr], X[te], y[te])


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def solver_iterations(model: DEQClassifier, X: torch.Tensor, solver: Anderson | Picard) -> dict[str, Any]:
    """Forward iterations of ``solver`` to reach its tol on every image of ``X`` (one batch)."""
    with torch.no_grad():
        x = model.encoder(X)
        cell = model.deq.cell
        _, info = fixed_point_solve(lambda z: cell(z, x), torch.zeros_like(x), solver, batched=True)
    return {"solver": repr(solver), "iterations": info.iterations, "residual": float(info.residual),
            "converged": bool(info.converged)}


HISTORY_KEYS = ("train_loss", "train_acc", "test_acc", "forward_iterations", "forward_residual",
                "backward_iterations", "backward_residual", "seconds")


CHECKPOINT_KEYS = ("epoch", "model", "adam", "history")


def train(data: Data, cfg: Config, ckpt: Path | None = None, *, saved: dict[str, Any] | None = None,
          show: bool = True) -> tuple[DEQClassifier, dict[str, list[float]]]:
    """Adam on the cross-entropy, one checkpoint per epoch, continuing from the checked state
    ``saved`` (:func:`bilevel.apps._runs.start_run`) if given; returns the model and history."""
    torch.manual_seed(cfg.seed)
    model = DEQClassifier(cfg, data.X_train.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, hist = 0, {k: [] for k in HISTORY_KEYS}
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["adam"])
        start, hist = saved["epoch"], saved["history"]
    epochs = range(start, cfg.epochs)
    bar = _runs.progress(epochs, desc="epochs", unit="epoch", initial=start, total=cfg.epochs) if show else epochs
    n = len(data.y_train)
    for epoch in bar:
        t0 = time.perf_counter()
        # the shuffle depends on (seed, epoch) only, so a resumed run repeats it exactly
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        stats = {"loss": 0.0, "correct": 0, "fwd_it": [], "fwd_res": [], "bwd_it": [], "bwd_res": []}
        model.train()
        for i in range(0, n, cfg.batch):
            idx = perm[i : i + cfg.batch]
            logits = model(data.X_train[idx])
            loss = F.cross_entropy(logits, data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            fwd, bwd = model.deq.forward_info, model.deq.backward_info
            stats["loss"] += float(loss.detach()) * len(idx)
            stats["correct"] += int((logits.argmax(1) == data.y_train[idx]).sum())
            stats["fwd_it"].append(fwd.iterations)
            stats["fwd_res"].append(float(fwd.residual))
            stats["bwd_it"].append(bwd.iterations)
            stats["bwd_res"].append(float(bwd.residual))
        model.eval()
        hist["train_loss"].append(stats["loss"] / n)
        hist["train_acc"].append(stats["correct"] / n)
        hist["test_acc"].append(accuracy(model, data.X_test, data.y_test))
        hist["forward_iterations"].append(sum(stats["fwd_it"]) / len(stats["fwd_it"]))
        hist["forward_residual"].append(max(stats["fwd_res"]))
        hist["backward_iterations"].append(sum(stats["bwd_it"]) / len(stats["bwd_it"]))
        hist["backward_residual"].append(max(stats["bwd_res"]))
        hist["seconds"].append(time.perf_counter() - t0)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{hist['train_loss'][-1]:.3f}", test_acc=f"{hist['test_acc'][-1]:.3f}",
                            fwd_it=f"{hist['forward_iterations'][-1]:.1f}",
                            bwd_it=f"{hist['backward_iterations'][-1]:.1f}")
        if ckpt is not None:
            _runs.save_checkpoint(ckpt, {"config": dataclasses.asdict(cfg), "epoch": epoch + 1,
                                         "model": model.state_dict(), "adam": opt.state_dict(),
                                         "history": hist})
    return model, hist


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True) -> dict[str, Any]:
    """Train, evaluate, compare forward solvers; writes ``results.json`` in ``out``."""
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=CHECKPOINT_KEYS, grow={"epochs": "epoch"})
    t0 = time.perf_counter()
    data = load_data(cfg)
    model, hist = train(data, cfg, out / _runs.CHECKPOINT, saved=saved, show=show)
    t_train = time.perf_counter() - t0
    model.eval()
    tol = cfg.compare_tol
    compare = {
        name: solver_iterations(model, data.X_test, s)
        for name, s in {"anderson": Anderson(maxiter=500, tol=tol, memory=cfg.anderson_memory),
                        "picard": Picard(maxiter=500, tol=tol)}.items()
    }
    results = {
        "config": dataclasses.asdict(cfg),
        "scales": {"config.lr": "linear"},  # the outer variables are the network's weights, not stored
        "data": {"n_train": len(data.y_train), "n_test": len(data.y_test)},
        "test_acc": accuracy(model, data.X_test, data.y_test),
        "train_acc": accuracy(model, data.X_train, data.y_train),
        "history": hist,
        "forward_solvers_on_test_set": compare,
        "timings": {"train_seconds": t_train, "total_seconds": time.perf_counter() - t0,
                    "threads": torch.get_num_threads()},
    }
    _runs.write_json(out / "results.json", results)
    return results


def _parser() -> argparse.ArgumentParser:
    p = _runs.job_parser("bilevel run deq-digits", "A deep-equilibrium classifier on digits, implicit gradients.",
                         "runs/deq-digits")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {Config.epochs})")
    p.add_argument("--forward", choices=("anderson", "picard"), default="anderson",
                   help="forward fixed-point solver (default anderson)")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    kw = _runs.config_kwargs(args, QUICK, {"epochs": 1})
    return Config(**kw, forward=args.forward)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    out = Path(args.out)
    with _runs.one_thread():  # a small problem: one thread is fastest
        res = run(cfg, out, resume=args.resume, show=not args.no_progress)
    h, cmp = res["history"], res["forward_solvers_on_test_set"]
    print(f"DEQ on digits: train/test = {res['data']['n_train']}/{res['data']['n_test']}, "
          f"hidden {cfg.hidden}, {cfg.epochs} epochs, forward {cfg.forward}, backward GMRES")
    print(f"test accuracy {res['test_acc']:.4f} (train {res['train_acc']:.4f}); "
          f"last epoch: forward {h['forward_iterations'][-1]:.1f} iterations (max residual "
          f"{h['forward_residual'][-1]:.1e}), backward {h['backward_iterations'][-1]:.1f} iterations "
          f"(max residual {h['backward_residual'][-1]:.1e})")
    print(f"to relative residual {cfg.compare_tol:g} on the test set: Anderson {cmp['anderson']['iterations']} "
          f"iterations, plain iteration {cmp['picard']['iterations']}")
    print(f"time {res['timings']['total_seconds']:.1f}s; wrote {out / 'results.json'}")
    return 0

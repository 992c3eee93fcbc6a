"""Hyper-representation: a shared embedding learned through per-episode heads (few-shot).

Franceschi, Frasconi, Salzo, Grazzi, Pontil, "Bilevel Programming for Hyperparameter
Optimization and Meta-Learning" (ICML 2018), Sec. 4: the outer variable λ is a
representation h_λ shared by all episodes, the inner variable of episode e is a linear
head W_e on top of it.  An N-way K-shot episode has a support set (x_s, y_s), K images
per class, and a query set (x_q, y_q) of classes never seen in meta-training::

    inner  W_e(λ) = argmin_W  g_e = ℓ(Z_s W, y_s) + ρ/2 ‖W‖²,   Z_s = h_λ(x_s) (rows L2-normalised)
    outer  min_λ  F(λ) = mean_e CE(s·Z_q W_e(λ), y_q),           Z_q = h_λ(x_q)

``--head ridge`` (default): ℓ = ½‖Z_s W − Y_s‖² (Y one-hot), solved in closed form,
W = Z_sᵀ(Z_s Z_sᵀ + ρI)⁻¹Y_s, and differentiated through that formula; ``--head
logistic``: ℓ = cross-entropy, solved by T gradient steps, the hypergradient by AID
(:func:`bilevel.hypergrad`, CG) or ITD (:func:`bilevel.unroll`) — ``--method aid|itd``.
The log-penalty log ρ and the logit scale log s are hparams too.  A meta-batch of
episodes is one ``torch.func.vmap``; the outer step is Adam on the embedding's
parameters (:func:`bilevel.nn.tensors`, :func:`bilevel.nn.call`, :func:`bilevel.nn.set_grad`).

Embedding: an MLP on 8×8 digits; a small CNN (two 3×3 convolutions with BatchNorm — in
train mode, normalising with the batch statistics of each episode's images, running
statistics unused — ReLU and 2×2 max-pooling, then a linear layer) on 28×28 images.

Data (meta-train on half of the classes, meta-test on the rest): ``digits`` (bundled
with scikit-learn; classes 0–4 / 5–9), ``fashion-mnist`` (local IDX files; 0–4 / 5–9), and
``omniglot`` from a local copy in torchvision's layout (``--data-dir DIR`` holding
``images_background/<alphabet>/<character>/*.png``; characters in sorted order, the
first half meta-train; images resized to 28×28 and inverted).

Baselines, with the same head fitted on the test episodes: the embedding pretrained by
supervised classification of the meta-train classes; the untrained (random) embedding.
Reported: mean test accuracy over ``test_episodes`` episodes (≥ 600 by default) of 5-way
1-shot and 5-shot, with a 95% interval.

    bilevel run hyperrep [--dataset digits|fashion-mnist|omniglot] [--data-dir DIR]
                         [--head ridge|logistic] [--method aid|itd] [--meta-steps N] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

import bilevel
from bilevel.apps import _runs
from bilevel.apps._data import EPISODE_DATASETS, Episodes, Pools, load_pools, sample_episodes
from bilevel.apps._data import load_omniglot as load_omniglot  # re-exported: --dataset omniglot's loader

Named = dict[str, torch.Tensor]
DATASETS = EPISODE_DATASETS


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``."""

    dataset: str = "digits"
    data_dir: str | None = None
    head: str = "ridge"  # "ridge" (closed form) or "logistic" (T gradient steps)
    method: str = "aid"  # logistic head: "aid" (hypergrad, CG) or "itd" (unroll)
    seed: int = 0
    meta_steps: int = 400  # outer Adam steps
    meta_batch: int = 8  # episodes per outer step (one vmap)
    ways: int = 5
    train_shots: int = 5  # K of the meta-training episodes
    test_shots: tuple[int, ...] = (1, 5)
    queries: int = 10  # query images per class
    lr: float = 1e-4  # Adam on the embedding (1e-3 over-specialises it to the 5 meta-train classes)
    ridge0: float = 1.0  # initial ρ (learned, in log scale)
    scale0: float = 10.0  # initial logit scale s (learned, in log scale)
    inner_steps: int = 50  # logistic head: gradient steps T
    cg_iters: int = 20  # logistic head, AID: CG iterations
    embed_dim: int = 64
    hidden: int = 128  # MLP hidden width (digits)
    channels: int = 32  # CNN channels (28×28 images)
    test_episodes: int = 600
    pretrain_steps: int = 400  # baseline: supervised steps on the meta-train classes
    pretrain_batch: int = 128


QUICK = {"meta_steps": 4, "meta_batch": 2, "queries": 3, "test_episodes": 20, "pretrain_steps": 4,
         "inner_steps": 10, "cg_iters": 5, "hidden": 16, "channels": 4, "embed_dim": 8}
CHECKPOINT_KEYS = ("step", "learner", "adam", "history")
HISTORY_KEYS = ("outer_loss", "query_acc", "log_ridge", "log_scale", "seconds")


# ----------------------------------------------------------------------------- data


def load_data(cfg: Config) -> Pools:
    """Meta-train / meta-test pools: the first half of the classes, and the rest."""
    return load_pools(cfg.dataset, cfg.data_dir, cfg.ways, max(cfg.train_shots, *cfg.test_shots) + cfg.queries)


# ----------------------------------------------------------------------------- model


class Learner(nn.Module):
    """The embedding h_λ and the two scalar hparams: log ρ (head penalty) and log s (logit scale)."""

    def __init__(self, cfg: Config, shape: tuple[int, int]) -> None:
        super().__init__()
        if shape == (8, 8):
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, cfg.hidden), nn.ReLU(),
                                      nn.Linear(cfg.hidden, cfg.embed_dim))
        else:
            c = cfg.channels
            side = shape[0] // 4
            self.body = nn.Sequential(
                nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(c * side * side, cfg.embed_dim))
        self.log_ridge = nn.Parameter(torch.tensor(math.log(cfg.ridge0)))
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.scale0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=-1)


def make_learner(cfg: Config, shape: tuple[int, int], seed: int) -> Learner:
    torch.manual_seed(seed)
    return Learner(cfg, shape)


def embed(learner: Learner, lam: Named, xs: torch.Tensor, xq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and query features of one episode in one call: BatchNorm (CNN) normalises with
    the statistics of the whole episode."""
    z = bilevel.nn.call(learner, lam, torch.cat([xs, xq]))
    return z[: len(xs)], z[len(xs):]


# ----------------------------------------------------------------------------- heads


def ridge_head(zs: torch.Tensor, ys: torch.Tensor, ways: int, rho: torch.Tensor) -> torch.Tensor:
    """W = argmin ½‖Z W − Y‖² + ρ/2‖W‖² = Zᵀ(Z Zᵀ + ρI)⁻¹Y (the n×n dual system: n = N·K is small)."""
    Y = F.one_hot(ys, ways).to(zs.dtype)
    K = zs @ zs.T + rho * torch.eye(len(zs), dtype=zs.dtype, device=zs.device)
    return zs.T @ torch.linalg.solve(K, Y)


def logistic_inner(W: torch.Tensor, rho: torch.Tensor, zs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(zs @ W, ys) + 0.5 * rho * (W**2).sum()


def logistic_step(rho: torch.Tensor) -> float:
    """GD step 1/L: with unit-norm features the cross-entropy's Hessian is ≤ ½ I (⊗ softmax ≤ ½)."""
    return 1.0 / (0.5 + float(rho))


def logistic_fit(zs: torch.Tensor, ys: torch.Tensor, ways: int, rho: torch.Tensor, steps: int,
                 eta: float) -> torch.Tensor:
    """T gradient steps from W = 0 (no graph: the hypergradient comes from AID)."""
    W = torch.zeros(zs.shape[1], ways, dtype=zs.dtype, device=zs.device)
    g = grad(logistic_inner)
    for _ in range(steps):
        W = W - eta * g(W, rho, zs, ys)
    return W


def episode_loss(learner: Learner, cfg: Config, lam: Named, ep: tuple[torch.Tensor, ...],
                 eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The outer loss of one episode (query cross-entropy) and its query accuracy, for the
    ridge head (differentiable through the closed form) or the logistic head by ITD."""
    xs, ys, xq, yq = ep
    zs, zq = embed(learner, lam, xs, xq)
    rho = lam["log_ridge"].exp()
    if cfg.head == "ridge":
        logits = lam["log_scale"].exp() * (zq @ ridge_head(zs, ys, cfg.ways, rho))
    else:  # ITD: the T steps recorded by bilevel.unroll, reverse mode through them
        def step(W: torch.Tensor, hp: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return W - eta * grad(logistic_inner)(W, hp[0], hp[1], ys)

        W0 = torch.zeros(zs.shape[1], cfg.ways, dtype=zs.dtype, device=zs.device)
        logits = zq @ bilevel.unroll(step, W0, (rho, zs, zq), cfg.inner_steps)
    return F.cross_entropy(logits, yq), (logits.argmax(-1) == yq).to(zs.dtype).mean()


def meta_gradient(learner: Learner, cfg: Config, eps: Episodes) -> tuple[Named, float, float]:
    """∇F(λ) over a meta-batch of episodes (one vmap), with the mean query loss and accuracy."""
    lam = bilevel.nn.tensors(learner)
    eta = logistic_step(lam["log_ridge"].exp()) if cfg.head == "logistic" else 0.0
    if cfg.head == "logistic" and cfg.method == "aid":
        return _aid_meta_gradient(learner, cfg, lam, eps, eta)

    def loss(lam: Named) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        losses, accs = vmap(lambda *ep: episode_loss(learner, cfg, lam, ep, eta))(*eps)
        return losses.mean(), (losses.mean().detach(), accs.mean().detach())

    g, (fval, acc) = grad(loss, has_aux=True)(lam)
    return g, float(fval), float(acc)


def _aid_meta_gradient(learner: Learner, cfg: Config, lam: Named, eps: Episodes,
                       eta: float) -> tuple[Named, float, float]:
    """Logistic head by AID: per episode, W by T steps, then bilevel.hypergrad with
    params = W and hparams = λ (embedding included): H v = ∇_W F solved by CG."""
    solver = bilevel.CG(maxiter=cfg.cg_iters, tol=1e-6)

    def one(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> Any:
        zs, _ = embed(learner, lam, xs, xq)
        W = logistic_fit(zs, ys, cfg.ways, lam["log_ridge"].exp(), cfg.inner_steps, eta)

        def inner_loss(W: torch.Tensor, hp: Named) -> torch.Tensor:
            zs, _ = embed(learner, hp, xs, xq)
            return logistic_inner(W, hp["log_ridge"].exp(), zs, ys)

        def outer_loss(W: torch.Tensor, hp: Named) -> torch.Tensor:
            _, zq = embed(learner, hp, xs, xq)
            return F.cross_entropy(zq @ W, yq)

        hg = bilevel.hypergrad(outer_loss, W, lam, inner_loss=inner_loss, solver=solver)
        _, zq = embed(learner, lam, xs, xq)
        logits = zq @ W
        return hg, F.cross_entropy(logits, yq), (logits.argmax(-1) == yq).to(zq.dtype).mean()

    hg, losses, accs = vmap(one)(*eps)
    # the logit scale does not enter the logistic head (W carries the scale): its gradient is 0
    return {k: g.mean(0) for k, g in hg.items()}, float(losses.mean()), float(accs.mean())


# ----------------------------------------------------------------------------- evaluation


def episode_accuracy(learner: Learner, cfg: Config, lam: Named, eps: Episodes) -> torch.Tensor:
    """Query accuracy of each episode with the configured head fitted on its support set."""
    rho = lam["log_ridge"].exp()
    eta = logistic_step(rho)

    def one(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        zs, zq = embed(learner, lam, xs, xq)
        if cfg.head == "ridge":
            W = ridge_head(zs, ys, cfg.ways, rho)
        else:
            W = logistic_fit(zs, ys, cfg.ways, rho, cfg.inner_steps, eta)
        return ((zq @ W).argmax(-1) == yq).to(zq.dtype).mean()

    with torch.no_grad():
        return vmap(one)(*eps)


def evaluate(learner: Learner, cfg: Config, pools: Pools, shots: int, device: torch.device,
             chunk: int = 50) -> dict[str, float]:
    """Mean accuracy over ``test_episodes`` meta-test episodes (a generator of their own, the
    same episodes for every model) and its 95% normal interval."""
    gen = torch.Generator().manual_seed(7_000_003 + 31 * cfg.seed + shots)
    lam = bilevel.nn.tensors(learner)
    accs = []
    for start in range(0, cfg.test_episodes, chunk):
        eps = sample_episodes(gen, pools.X_test, pools.y_test, min(chunk, cfg.test_episodes - start), cfg.ways,
                              shots, cfg.queries)
        accs.append(episode_accuracy(learner, cfg, lam, Episodes(*(t.to(device) for t in eps))))
    a = torch.cat(accs).double().cpu()
    half = 1.96 * float(a.std()) / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    return {"accuracy": float(a.mean()), "ci95": half, "episodes": len(a)}


def pretrain(cfg: Config, pools: Pools, device: torch.device) -> tuple[Learner, dict[str, Any]]:
    """Baseline: the embedding + a linear classifier over all meta-train classes, trained by
    Adam on minibatches (seeded by the run's seed); the embedding is then frozen."""
    learner = make_learner(cfg, pools.shape, cfg.seed).to(device)
    n_classes = int(pools.y_train.max()) + 1
    clf = nn.Linear(cfg.embed_dim, n_classes).to(device)
    opt = torch.optim.Adam([*learner.body.parameters(), *clf.parameters()], lr=cfg.lr)
    gen = torch.Generator().manual_seed(5_000_011 + cfg.seed)
    losses = []
    for _ in range(cfg.pretrain_steps):
        idx = torch.randint(len(pools.y_train), (cfg.pretrain_batch,), generator=gen)
        x, y = pools.X_train[idx].to(device), pools.y_train[idx].to(device)
        loss = F.cross_entropy(clf(learner.body(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return learner, {"final_loss": losses[-1] if losses else None, "steps": cfg.pretrain_steps}


# ----------------------------------------------------------------------------- the job


def check_config(cfg: Config) -> None:
    if cfg.dataset not in DATASETS:
        raise _runs.UserError(f"--dataset {cfg.dataset!r} is not known: pass one of {', '.join(DATASETS)}")
    if cfg.head not in ("ridge", "logistic"):
        raise _runs.UserError(f"--head {cfg.head!r} is not known: pass ridge or logistic")
    if cfg.method not in ("aid", "itd"):
        raise _runs.UserError(f"--method {cfg.method!r} is not known: pass aid or itd")


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True, every: int = 1,
        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Meta-train the embedding, the two baselines, test accuracy tables, results.json + plot."""
    check_config(cfg)
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=CHECKPOINT_KEYS, grow={"meta_steps": "step"})
    device = torch.device(device)
    t_start = time.perf_counter()
    pools = load_data(cfg)
    learner = make_learner(cfg, pools.shape, cfg.seed).to(device)
    opt = torch.optim.Adam(learner.parameters(), lr=cfg.lr)
    if saved is not None:
        learner.load_state_dict(saved["learner"])
        opt.load_state_dict(saved["adam"])
    state = saved if saved is not None else {"config": dataclasses.asdict(cfg), "step": 0,
                                             "history": {k: [] for k in HISTORY_KEYS}}
    hist = state["history"]

    def save(st: dict[str, Any]) -> None:
        st["learner"] = {k: v.detach().clone() for k, v in learner.state_dict().items()}
        st["adam"] = opt.state_dict()
        _runs.save_checkpoint(out / _runs.CHECKPOINT, st)

    for k in _runs.steps(cfg.meta_steps, state, save, every=every, desc="meta-steps", show=show):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
        eps = sample_episodes(gen, pools.X_train, pools.y_train, cfg.meta_batch, cfg.ways, cfg.train_shots,
                              cfg.queries)
        g, fval, acc = meta_gradient(learner, cfg, Episodes(*(t.to(device) for t in eps)))
        opt.zero_grad()
        bilevel.nn.set_grad(learner, g)
        opt.step()
        hist["outer_loss"].append(fval)
        hist["query_acc"].append(acc)
        hist["log_ridge"].append(float(learner.log_ridge.detach()))
        hist["log_scale"].append(float(learner.log_scale.detach()))
        hist["seconds"].append(time.perf_counter() - t0)
    t_meta = time.perf_counter() - t_start

    t0 = time.perf_counter()
    pre, pre_info = pretrain(cfg, pools, device)
    t_pre = time.perf_counter() - t0
    rand = make_learner(cfg, pools.shape, cfg.seed).to(device)
    models = {"hyper-representation": learner, "pretrained + head": pre, "random features + head": rand}
    t0 = time.perf_counter()
    test = {name: {str(K): evaluate(m, cfg, pools, K, device) for K in cfg.test_shots} for name, m in models.items()}
    t_eval = time.perf_counter() - t0
    results = {
        "config": dataclasses.asdict(cfg),
        "data": {"dataset": cfg.dataset, "source": pools.source, "shape": list(pools.shape),
                 "meta_train_images": len(pools.y_train), "meta_train_classes": int(pools.y_train.max()) + 1,
                 "meta_test_images": len(pools.y_test), "meta_test_classes": int(pools.y_test.max()) + 1},
        "test": test,
        "learned": {"ridge": math.exp(float(learner.log_ridge.detach())),
                    "scale": math.exp(float(learner.log_scale.detach()))},
        "pretrain": pre_info,
        "history": hist,
        "scales": {"log_ridge": "log", "log_scale": "log", "accuracy": "linear (fraction)"},
        "timings": {"meta_train_seconds": t_meta, "pretrain_seconds": t_pre, "eval_seconds": t_eval,
                    "seconds_per_meta_step": sorted(hist["seconds"])[len(hist["seconds"]) // 2]
                    if hist["seconds"] else None,
                    "threads": torch.get_num_threads(), "device": str(device)},
    }
    results["timings"]["total_seconds"] = time.perf_counter() - t_start
    _runs.write_json(out / "results.json", results)
    plot(results, out / "hyperrep.png")
    return results


# ----------------------------------------------------------------------------- output


def table(results: dict[str, Any]) -> str:
    cfg = results["config"]
    shots = [str(k) for k in cfg["test_shots"]]
    head = f"{'':<26}" + "".join(f"{cfg['ways']}-way {k}-shot".rjust(20) for k in shots)
    lines = [f"{results['data']['dataset']}: test accuracy over {cfg['test_episodes']} meta-test episodes "
             f"(mean ± 95% interval), {cfg['head']} head" + (f" ({cfg['method']})" if cfg["head"] == "logistic"
                                                              else ""), head]
    for name, r in results["test"].items():
        cells = "".join(f"{100 * r[k]['accuracy']:>12.1f} ± {100 * r[k]['ci95']:.1f}".rjust(20) for k in shots)
        lines.append(f"{name:<26}{cells}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Outer loss and query accuracy per meta-step; test accuracy per model and shot."""
    fig, (ax1, ax2) = _runs.figure(ncols=2, size=(11, 3.8))
    h = results["history"]
    steps = range(len(h["outer_loss"]))
    ax1.plot(steps, h["outer_loss"], label="query cross-entropy")
    ax1b = ax1.twinx()
    ax1b.plot(steps, h["query_acc"], color=_runs.PALETTE[1], label="query accuracy")
    ax1.set(xlabel="meta-step", ylabel="query cross-entropy", title="Meta-training episodes")
    ax1b.set_ylabel("query accuracy")
    ax1.legend(loc="upper left", fontsize=8)
    ax1b.legend(loc="upper right", fontsize=8)
    _runs.accuracy_bars(ax2, results["test"], results["config"]["test_shots"], results["config"]["ways"],
                        "Meta-test episodes (95% intervals)")
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = _runs.job_parser("bilevel run hyperrep", "Hyper-representation (Franceschi et al. 2018): a shared "
                         "embedding learned through per-episode heads, few-shot.", "runs/hyperrep", device=True,
                         checkpoint_every=True)
    p.add_argument("--dataset", default="digits", help="digits (default), fashion-mnist or omniglot")
    p.add_argument("--data-dir", dest="data_dir", default=None,
                   help="folder of the dataset (fashion-mnist IDX files; omniglot: holding images_background)")
    p.add_argument("--head", default="ridge", help="ridge (closed form, default) or logistic")
    p.add_argument("--method", default="aid", help="logistic head: aid (default) or itd")
    p.add_argument("--meta-steps", dest="meta_steps", type=int, default=None,
                   help=f"outer steps (default {Config.meta_steps})")
    p.add_argument("--test-episodes", dest="test_episodes", type=int, default=None,
                   help=f"meta-test episodes per shot setting (default {Config.test_episodes})")
    p.add_argument("--queries", type=int, default=None, help=f"query images per class (default {Config.queries})")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    kw = _runs.config_kwargs(args, QUICK, {"meta_steps": 1, "test_episodes": 2, "queries": 1})
    kw.update(dataset=args.dataset, data_dir=args.data_dir, head=args.head, method=args.method)
    cfg = Config(**kw)
    check_config(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    res = _runs.run_small(run, cfg, args)
    out = Path(args.out)
    print(table(res))
    t = res["timings"]
    print(f"learned ρ = {res['learned']['ridge']:.3g}, logit scale s = {res['learned']['scale']:.3g}; time: "
          f"{t['meta_train_seconds']:.0f}s meta-training, {t['pretrain_seconds']:.0f}s pretraining, "
          f"{t['eval_seconds']:.0f}s evaluation, {t['total_seconds']:.0f}s in all")
    print(f"wrote {out / 'results.json'} and {out / 'hyperrep.png'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Hypergradients of a deep network: an MLP of ~10⁶ parameters (or a small CNN) on MNIST-shaped inputs.

Problem (synthetic tensors of MNIST's shape; labels from a random teacher network)::

    inner  g(w, λ) = CE_train(MLP_w) + ½ Σ_groups e^{λ_g} ‖w_g‖²     (one λ per weight/bias tensor)
    outer  f(w)    = CE_val(MLP_w)

The inner problem is never solved exactly: ``--inner-steps`` Adam steps (mini-batches),
warm-started across outer steps, as a deep-learning user would.  Its Hessian is then
indefinite, so every AID method solves the damped system ``(H + δI) v = ∇_w f`` — what
iMAML, TorchOpt (``ridge=``) and Betty users do; ``δ = --damping``.

Part 1, **same work** (one hypergradient at a fixed ``(w, λ)``, K CG iterations, tol 0):

* ``bilevel AID-CG``: :func:`bilevel.hypergrad` with ``CG(maxiter=K, tol=0)`` and ``damping=δ``;
* ``hand loop``: ``torch.autograd.grad`` Hessian–vector products through one retained
  graph of ∇_w g and a K-iteration CG loop written out (the floor for this work);
* ``TorchOpt``: ``torchopt.diff.implicit.custom_root`` with ``solve_cg(maxiter=K, ridge=δ, rtol=0)``
  (skipped when torchopt is not installed);
* ``bilevel ITD-trunc``: :func:`bilevel.unroll` through K more gradient steps from ``w``,
  back-propagated (truncated ITD; a different approximation, shown for its cost).

Median wall time of ``--repeats`` calls and peak memory (RSS above a baseline on CPU, each
method alone in a forked process; CUDA allocator peak on a GPU); the AID hypergradients
must agree (relative difference printed; in float64 at a small width they agree to 1e-6).

Part 2, **less work** (``--outer-steps`` outer steps of Adam on λ, with
``--inner-per-outer`` inner Adam steps between them; 0 freezes the inner so that only λ
moves): at each step, the number of CG iterations each strategy needs to get within
``--target`` (relative) of the converged damped AID hypergradient (CG to 1e-8, computed off
the clock), and its time.  Also printed: how much that converged solution ``v`` changes from
one outer step to the next — the most any warm start or recycled curvature could reuse.

* ``CG``: plain, cold start (TorchOpt's and our default);
* ``CG warm``: ``init=`` the previous outer step's ``v``;
* ``CG + Adam diag``: preconditioned by ``diag(c·√v̂_Adam + e^{λ_g} + δ)``, the inner
  Adam's second moments (free) scaled by one Rayleigh quotient ``c``;
* ``CG + Hutchinson``: preconditioned by a Hutchinson estimate of ``diag(H) + δ`` (8 HVPs,
  refreshed every 5 outer steps), floored at ``e^{λ_g} + δ``;
* ``CG warm + Hutchinson``: both.

    python benchmarks/deep.py                 # MLP 784-1024-256-10 (1.07M params), float32
    python benchmarks/deep.py --quick         # a small MLP: seconds
    python benchmarks/deep.py --model cnn --damping 5   # a small CNN (20,490 params) on 1×28×28 inputs
    python benchmarks/deep.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import configure_threads, format_table, machine_info, write_json  # noqa: E402
from memory import CudaMeter, RSSMeter, fix_mmap_threshold  # noqa: E402

import bilevel  # noqa: E402

Params = list[torch.Tensor]


@dataclass(frozen=True)
class Config:
    model: str = "mlp"  # "mlp" (widths) or "cnn" (two stride-2 3×3 convolutions, 16 and 32 channels, on 28×28)
    widths: tuple[int, ...] = (784, 1024, 256, 10)
    n_train: int = 1024
    n_val: int = 1024
    batch: int = 128  # inner Adam mini-batch
    inner_steps: int = 100  # Adam steps before the first hypergradient
    inner_per_outer: int = 25  # Adam steps between outer steps (0: the inner frozen, only λ moves)
    inner_lr: float = 1e-3
    lam0: float = -4.0  # initial log-penalty of every group
    damping: float = 1.0  # iMAML-sized: H + δI must be positive definite at an inner solution this rough
    K: int = 10
    repeats: int = 3
    outer_steps: int = 8
    outer_lr: float = 0.05
    target: float = 1e-2
    max_cg: int = 200
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0


QUICK = {"widths": (64, 64, 32, 10), "n_train": 256, "n_val": 256, "inner_steps": 40, "inner_per_outer": 10,
         "repeats": 2, "outer_steps": 3}


# --------------------------------------------------------------------------- the problem


@dataclass
class Problem:
    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    cfg: Config

    def forward(self, w: Params, X: torch.Tensor) -> torch.Tensor:
        if self.cfg.model == "cnn":
            a = F.relu(F.conv2d(X.view(-1, 1, 28, 28), w[0], w[1], stride=2, padding=1))  # 16×14×14
            a = F.relu(F.conv2d(a, w[2], w[3], stride=2, padding=1))  # 32×7×7
            return a.flatten(1) @ w[4] + w[5]
        a = X
        for i in range(0, len(w) - 2, 2):
            a = torch.relu(a @ w[i] + w[i + 1])
        return a @ w[-2] + w[-1]

    def inner_loss(self, w: Params, lam: Params, X: torch.Tensor | None = None, y: torch.Tensor | None = None):
        X, y = (self.X, self.y) if X is None else (X, y)
        reg = sum(lg.exp() * (t * t).sum() for lg, t in zip(lam, w))
        return F.cross_entropy(self.forward(w, X), y) + 0.5 * reg

    def outer_loss(self, w: Params, lam: Params) -> torch.Tensor:
        return F.cross_entropy(self.forward(w, self.Xv), self.yv)


def param_shapes(cfg: Config) -> list[tuple[int, ...]]:
    if cfg.model == "cnn":
        return [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (32 * 7 * 7, 10), (10,)]
    return [shape for a, b in zip(cfg.widths[:-1], cfg.widths[1:]) for shape in ((a, b), (b,))]


def make_problem(cfg: Config) -> tuple[Problem, Params, Params]:
    g = torch.Generator().manual_seed(cfg.seed)
    dt, dev = getattr(torch, cfg.dtype), torch.device(cfg.device)
    d, c = (784, 10) if cfg.model == "cnn" else (cfg.widths[0], cfg.widths[-1])
    X = torch.rand(cfg.n_train + cfg.n_val, d, generator=g)  # pixel-like values in [0, 1]
    teacher = [torch.randn(d, 64, generator=g) / d**0.5, torch.randn(64, c, generator=g) / 8.0]
    logits = torch.tanh((X - 0.5) @ teacher[0]) @ teacher[1]
    y = logits.argmax(1)
    prob = Problem(X[: cfg.n_train].to(dev, dt), y[: cfg.n_train].to(dev), X[cfg.n_train :].to(dev, dt),
                   y[cfg.n_train :].to(dev), cfg)
    w: Params = []
    for shape in param_shapes(cfg):  # He initialisation (fan-in: a conv kernel's c·k·k, a matrix's rows), zero biases
        fan_in = math.prod(shape[1:]) if len(shape) == 4 else shape[0]
        w.append((torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5).to(dev, dt) if len(shape) > 1
                 else torch.zeros(shape, device=dev, dtype=dt))
    lam = [torch.full((), cfg.lam0, device=dev, dtype=dt) for _ in w]
    return prob, w, lam


class Inner:
    """Adam on the inner loss, warm-started; keeps its state (the second moments are a free
    curvature estimate for preconditioning)."""

    def __init__(self, prob: Problem, w: Params, cfg: Config):
        self.prob, self.cfg = prob, cfg
        self.w = [t.clone().requires_grad_() for t in w]
        self.opt = torch.optim.Adam(self.w, lr=cfg.inner_lr)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.steps = 0

    def run(self, lam: Params, steps: int) -> Params:
        n = self.prob.X.shape[0]
        for _ in range(steps):
            idx = torch.randint(n, (self.cfg.batch,), generator=self.gen).to(self.prob.X.device)
            self.opt.zero_grad(set_to_none=True)
            self.prob.inner_loss(self.w, [t.detach() for t in lam], self.prob.X[idx], self.prob.y[idx]).backward()
            self.opt.step()
            self.steps += 1
        return [t.detach() for t in self.w]

    def second_moments(self) -> Params:
        out = []
        for t in self.w:
            st = self.opt.state[t]
            bias = 1 - self.opt.param_groups[0]["betas"][1] ** int(st["step"])
            out.append(st["exp_avg_sq"] / bias)
        return out


# --------------------------------------------------------------------------- same work


def bilevel_aid(prob: Problem, w: Params, lam: Params, cfg: Config, K: int | None = None, init: Any = None,
                precond: Any = None, tol: float = 0.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.ConvergenceWarning)  # tol=0: K iterations, by design
        return bilevel.hypergrad(prob.outer_loss, w, lam, inner_loss=prob.inner_loss,
                                 solver=bilevel.CG(maxiter=K or cfg.K, tol=tol), damping=cfg.damping,
                                 init=init, precond=precond, inner_tol=float("inf"), return_info=True,
                                 estimate=False)  # the same work as the others: no error estimate


def hand_loop(prob: Problem, w: Params, lam: Params, cfg: Config) -> Params:
    """The floor: HVPs by autograd through one retained graph of ∇_w g, K CG iterations."""
    wr = [t.detach().requires_grad_() for t in w]
    lr = [t.detach().requires_grad_() for t in lam]
    fw = torch.autograd.grad(prob.outer_loss(wr, lr), wr)
    gw = torch.autograd.grad(prob.inner_loss(wr, lr), wr, create_graph=True)

    def hvp(v: Params) -> Params:
        hv = torch.autograd.grad(gw, wr, v, retain_graph=True)
        return [a + cfg.damping * b for a, b in zip(hv, v)]

    dot = lambda a, b: sum((x * y).sum() for x, y in zip(a, b))  # noqa: E731
    x = [torch.zeros_like(t) for t in fw]
    r = [t.clone() for t in fw]
    p = [t.clone() for t in r]
    rr = dot(r, r)
    for _ in range(cfg.K):
        Ap = hvp(p)
        alpha = rr / dot(p, Ap)
        x = [a + alpha * b for a, b in zip(x, p)]
        r = [a - alpha * b for a, b in zip(r, Ap)]
        rr_new = dot(r, r)
        p = [a + (rr_new / rr) * b for a, b in zip(r, p)]
        rr = rr_new
    cross = torch.autograd.grad(gw, lr, x, allow_unused=True)
    return [-c if c is not None else torch.zeros_like(t) for c, t in zip(cross, lam)]


def torchopt_aid(prob: Problem, w: Params, lam: Params, cfg: Config) -> Params:
    import torchopt

    warnings.filterwarnings("ignore", category=FutureWarning, module="torchopt")  # its functorch.vjp calls
    from torchopt.diff.implicit import custom_root

    def optimality(w_star: tuple[torch.Tensor, ...], lam_: tuple[torch.Tensor, ...]):
        # TorchOpt differentiates this with functorch transforms: torch.func.grad, not autograd.grad
        return torch.func.grad(lambda ws: prob.inner_loss(list(ws), list(lam_)))(w_star)

    # rtol=0: exactly K iterations, as the others (its default rtol=1e-5 stops early on a well-damped system)
    solve = torchopt.linear_solve.solve_cg(maxiter=cfg.K, ridge=cfg.damping, rtol=0.0)

    @custom_root(optimality, argnums=1, solve=solve)
    def solver(w0: tuple[torch.Tensor, ...], lam_: tuple[torch.Tensor, ...]):
        return w0  # the inner solution, computed before

    lr = tuple(t.detach().requires_grad_() for t in lam)
    w_star = solver(tuple(t.detach() for t in w), lr)
    return list(torch.autograd.grad(prob.outer_loss(list(w_star), list(lr)), lr, allow_unused=True))


def itd_truncated(prob: Problem, w: Params, lam: Params, cfg: Config) -> Params:
    eta = 0.1
    lr = [t.detach().requires_grad_() for t in lam]

    def step(wt: Params, lam_: Params) -> Params:
        g = torch.func.grad(prob.inner_loss)(wt, lam_)
        return [a - eta * b for a, b in zip(wt, g)]

    wT = bilevel.unroll(step, [t.detach() for t in w], lr, cfg.K)
    return list(torch.autograd.grad(prob.outer_loss(wT, lr), lr))


SAME_WORK: dict[str, Callable[[Problem, Params, Params, Config], Params]] = {
    "bilevel AID-CG": lambda p, w, lam, c: bilevel_aid(p, w, lam, c)[0],
    "hand loop": hand_loop,
    "TorchOpt": torchopt_aid,
    "bilevel ITD-trunc": itd_truncated,
}


def _flat(x: Params) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in x]).double()


def rel(a: Params, b: Params) -> float:
    return float((_flat(a) - _flat(b)).norm() / _flat(b).norm().clamp_min(1e-300))


def _sync(cfg: Config) -> None:
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_same_work(name: str, cfg: Config) -> dict[str, Any]:
    """One method alone: build the problem, inner Adam, then time ``repeats`` calls and
    measure the peak memory of one more."""
    fixed = cfg.device == "cpu" and fix_mmap_threshold()
    torch.manual_seed(cfg.seed)
    prob, w0, lam = make_problem(cfg)
    w = Inner(prob, w0, cfg).run(lam, cfg.inner_steps)
    fn = SAME_WORK[name]
    fn(prob, w, lam, cfg)  # warm-up (lazy imports, first autograd use)
    times = []
    for _ in range(cfg.repeats):
        _sync(cfg)
        t0 = time.perf_counter()
        out = fn(prob, w, lam, cfg)
        _sync(cfg)
        times.append(time.perf_counter() - t0)
    meter = CudaMeter() if cfg.device.startswith("cuda") else RSSMeter()
    out = fn(prob, w, lam, cfg)
    peak = meter.peak()
    return {"method": name, "median_ms": 1e3 * statistics.median(times), "peak_mib": peak / 2**20,
            "how": meter.how + (", mmap threshold 64 KiB" if fixed else ""),
            "hypergrad": [float(t) for t in _flat(out)]}


def _child(name: str, cfg: Config, conn: Any) -> None:
    try:
        conn.send(measure_same_work(name, cfg))
    except Exception as err:  # reported in the table; the others go on
        conn.send({"method": name, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"})
    finally:
        conn.close()


def run_alone(name: str, cfg: Config) -> dict[str, Any]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn" if cfg.device.startswith("cuda") else "fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, cfg, send))
    proc.start()
    send.close()
    try:
        out = recv.recv()
    except EOFError:
        out = {"method": name, "error": "the process ended without a result"}
    proc.join()
    return out


# --------------------------------------------------------------------------- less work


def hutchinson_diag(prob: Problem, w: Params, lam: Params, cfg: Config, probes: int = 8) -> Params:
    """diag(H) ≈ mean over Rademacher z of z ⊙ H z (``probes`` HVPs), floored at e^{λ_g}."""
    wr = [t.detach().requires_grad_() for t in w]
    gw = torch.autograd.grad(prob.inner_loss(wr, lam), wr, create_graph=True)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    acc = [torch.zeros_like(t) for t in w]
    for _ in range(probes):
        z = [(torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t) for t in w]
        hz = torch.autograd.grad(gw, wr, z, retain_graph=True)
        acc = [a + zi * h / probes for a, zi, h in zip(acc, z, hz)]
    return [torch.maximum(a, lg.exp()) + cfg.damping for a, lg in zip(acc, lam)]


def adam_diag(prob: Problem, w: Params, lam: Params, v2: Params, cfg: Config) -> Params:
    """diag(c·√v̂ + e^{λ_g} + δ) with c from one Rayleigh quotient: ⟨z, H z⟩ = c⟨z, √v̂ z⟩ + Σ e^λ‖z_g‖²."""
    wr = [t.detach().requires_grad_() for t in w]
    gw = torch.autograd.grad(prob.inner_loss(wr, lam), wr, create_graph=True)
    z = [torch.ones_like(t) for t in w]
    hz = torch.autograd.grad(gw, wr, z)
    zhz = sum((a * b).sum() for a, b in zip(z, hz))
    reg = sum(lg.exp() * (t * t).sum() for lg, t in zip(lam, z))
    sq = [s.sqrt() for s in v2]
    zsz = sum((a * a * s).sum() for a, s in zip(z, sq))
    c = torch.clamp((zhz - reg) / zsz.clamp_min(1e-30), min=0.0)
    return [c * s + lg.exp() + cfg.damping for s, lg in zip(sq, lam)]


def iterations_to_target(prob: Problem, w: Params, lam: Params, ref: Params, cfg: Config, init: Any,
                         precond: Any) -> int:
    """Fewest CG iterations (doubling, then bisection) whose hypergradient is within target."""
    def ok(k: int) -> bool:
        return rel(bilevel_aid(prob, w, lam, cfg, K=k, init=init, precond=precond)[0], ref) <= cfg.target

    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > cfg.max_cg:
            return cfg.max_cg
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


STRATEGIES = ("CG", "CG warm", "CG + Adam diag", "CG + Hutchinson", "CG warm + Hutchinson")


def less_work(cfg: Config) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    prob, w0, lam = make_problem(cfg)
    inner = Inner(prob, w0, cfg)
    w = inner.run(lam, cfg.inner_steps)
    lam = [t.clone().requires_grad_() for t in lam]
    outer_opt = torch.optim.Adam(lam, lr=cfg.outer_lr)
    rows: list[dict[str, Any]] = []
    v_change: list[float] = []  # ‖v*_t − v*_{t−1}‖/‖v*_t‖: what a warm start or recycled curvature can save
    prev_v: dict[str, Any] = {s: None for s in STRATEGIES}
    prev_ref_v: Params | None = None
    hutch: Params | None = None
    for step in range(cfg.outer_steps):
        lam_d = [t.detach() for t in lam]
        ref, ref_info = bilevel_aid(prob, w, lam_d, cfg, K=cfg.max_cg * 5, tol=1e-8)
        if prev_ref_v is not None:
            v_change.append(rel(prev_ref_v, ref_info.v))
        prev_ref_v = ref_info.v
        t0 = time.perf_counter()
        if step % 5 == 0 or hutch is None:
            hutch = hutchinson_diag(prob, w, lam_d, cfg)
        hutch_s = time.perf_counter() - t0 if step % 5 == 0 else 0.0
        t0 = time.perf_counter()
        adiag = adam_diag(prob, w, lam_d, inner.second_moments(), cfg)
        adam_s = time.perf_counter() - t0
        pcs = {"CG": None, "CG warm": None, "CG + Adam diag": adiag, "CG + Hutchinson": hutch,
               "CG warm + Hutchinson": hutch}
        for s in STRATEGIES:
            pc = pcs[s]
            precond = None if pc is None else (lambda v, pc=pc: [a / b for a, b in zip(v, pc)])
            init = prev_v[s] if "warm" in s else None
            k = iterations_to_target(prob, w, lam_d, ref, cfg, init, precond)
            _sync(cfg)
            t0 = time.perf_counter()
            hg, info = bilevel_aid(prob, w, lam_d, cfg, K=k, init=init, precond=precond)
            _sync(cfg)
            secs = time.perf_counter() - t0 + (hutch_s if "Hutchinson" in s else adam_s if "Adam" in s else 0.0)
            prev_v[s] = info.v
            rows.append({"outer_step": step, "strategy": s, "cg_iterations": k, "seconds": secs,
                         "rel_err": rel(hg, ref)})
        outer_opt.zero_grad(set_to_none=True)
        for t, g in zip(lam, ref):
            t.grad = g.detach().clone()
        outer_opt.step()
        w = inner.run(lam, cfg.inner_per_outer)  # 0 steps: the same w
    totals = {}
    for s in STRATEGIES:
        mine = [r for r in rows if r["strategy"] == s]
        totals[s] = {"cg_iterations": sum(r["cg_iterations"] for r in mine),
                     "seconds": sum(r["seconds"] for r in mine),
                     "worst_rel_err": max(r["rel_err"] for r in mine)}
    base = totals["CG"]["seconds"]
    for s in STRATEGIES:
        totals[s]["time_vs_CG"] = totals[s]["seconds"] / base
    return {"per_step": rows, "totals": totals, "v_change": v_change}


# --------------------------------------------------------------------------- main


def agreement_float64(cfg: Config) -> dict[str, float]:
    """The AID methods at a small width in float64: same K, same damping → same numbers."""
    small = Config(**{**asdict(cfg), **QUICK, "dtype": "float64", "device": "cpu"})
    prob, w0, lam = make_problem(small)
    w = Inner(prob, w0, small).run(lam, small.inner_steps)
    ours = bilevel_aid(prob, w, lam, small)[0]
    out = {"hand loop": rel(ours, hand_loop(prob, w, lam, small))}
    try:
        out["TorchOpt"] = rel(ours, torchopt_aid(prob, w, lam, small))
    except ImportError:
        pass
    return out


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small MLP: seconds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    p.add_argument("--K", type=int, default=Config.K)
    p.add_argument("--damping", type=float, default=Config.damping)
    p.add_argument("--outer-steps", type=int, default=None)
    p.add_argument("--inner-per-outer", type=int, default=None,
                   help=f"inner Adam steps between outer steps (default {Config.inner_per_outer}; 0: inner frozen)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: same,less")
    p.add_argument("--out", default="benchmarks/results/deep.json")
    args = p.parse_args(argv)
    kw: dict[str, Any] = dict(QUICK) if args.quick else {}
    kw.update(device=args.device, dtype=args.dtype, K=args.K, damping=args.damping, model=args.model)
    for key in ("outer_steps", "inner_per_outer"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    return Config(**kw), args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"deep.py: --device {cfg.device}, but torch sees no CUDA device here; nothing measured.")
        return 0
    threads = configure_threads(args.threads)
    # counted, not built: no torch work in this process before the measurements fork (OpenMP after fork hangs)
    n_params = sum(math.prod(shape) for shape in param_shapes(cfg))
    name = "CNN 1x28x28 -(3x3/2)-> 16 -(3x3/2)-> 32 -> 10" if cfg.model == "cnn" else \
        f"MLP {'-'.join(map(str, cfg.widths))}"
    print(f"{name} ({n_params:,} parameters), {cfg.dtype} on {cfg.device}, "
          f"damping {cfg.damping}, {threads['threads']} thread(s)")
    payload: dict[str, Any] = {"benchmark": "deep", "config": asdict(cfg), "machine": machine_info(threads),
                               "n_params": n_params}
    skip = set(filter(None, args.skip.split(",")))
    if "same" not in skip:
        rows = [run_alone(name, cfg) for name in SAME_WORK]
        hand = next(r for r in rows if r["method"] == "hand loop")
        ours = next(r for r in rows if r["method"] == "bilevel AID-CG")
        body = []
        for r in rows:
            if "error" in r:
                body.append([r["method"], None, None, None, None, None, r["error"][:60]])
                continue
            same = "hypergrad" in ours and r["method"] != "bilevel ITD-trunc"
            diff = rel([torch.tensor(r["hypergrad"])], [torch.tensor(ours["hypergrad"])]) if same else None
            body.append([r["method"], r["median_ms"], f"{r['median_ms'] / hand['median_ms']:.2f}x",
                         r["peak_mib"], f"{r['peak_mib'] / max(hand['peak_mib'], 1e-9):.2f}x", diff, ""])
        for r in rows:
            r.pop("hypergrad", None)
        print(f"\nSame work: one hypergradient, K = {cfg.K} CG iterations (median of {cfg.repeats})")
        print(format_table(["method", "ms", "time vs hand", "peak MiB", "mem vs hand", "rel diff vs ours", "note"],
                           body))
        payload["same_work"] = rows
        agree = agreement_float64(cfg)
        print("float64 agreement at a small width (relative difference to bilevel AID-CG): "
              + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))
        payload["agreement_float64"] = agree
    if "less" not in skip:
        res = less_work(cfg)
        print(f"\nLess work: {cfg.outer_steps} outer steps ({cfg.inner_per_outer} inner Adam steps between them), "
              f"CG iterations and time to within {cfg.target:g} of the converged damped hypergradient")
        if res["v_change"]:
            print("relative change of the solution v between outer steps: "
                  + ", ".join(f"{c:.2g}" for c in res["v_change"]))
        print(format_table(["strategy", "CG iterations", "seconds", "time vs CG", "worst rel err"],
                           [[s, t["cg_iterations"], t["seconds"], f"{t['time_vs_CG']:.2f}x", t["worst_rel_err"]]
                            for s, t in res["totals"].items()]))
        payload["less_work"] = res
    print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

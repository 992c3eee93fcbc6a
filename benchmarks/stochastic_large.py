"""Large data: stochastic hypergradient (SID) vs deterministic AID on n = 10⁶ samples.

Per-feature-L2 logistic regression::

    g(w, λ) = (1/n) Σ_i log(1 + exp(−y_i x_iᵀw)) + ½ Σ_j e^{λ_j} w_j²     (n = 10⁶ training rows)
    f(w)    = (1/n_v) Σ_i log(1 + exp(−y_i x_iᵀw))                         (n_v = 10⁴ validation rows)

The training set is a fixed function of the seed, stored as ``n/chunk`` chunks that are
regenerated whenever they are read (as a loader reads files): row block ``c`` is drawn
from ``torch.Generator().manual_seed(seed·10⁶ + c)``.  The stochastic path never holds
more than one chunk: a ``torch.utils.data.DataLoader`` over an ``IterableDataset`` that
visits the chunks in a shuffled order, each cut into shuffled minibatches.  The
deterministic path (AID: full-batch gradient steps on ``g``, then :func:`bilevel.hypergrad`
with CG) holds the dense ``n × d`` float64 matrix.

Exact reference (in the parent process, not measured): Newton's method on the full data
to machine precision; then ``∇F = −e^λ ⊙ w ⊙ H⁻¹∇_w f``.

For each method a ladder of budgets (SID: batch size and steps; AID: gradient steps) is
climbed until the relative error ``‖ĝ − ∇F‖/‖∇F‖ ≤ 1e-2``; the time of that run and the
peak resident memory of the process running the ladder (``VmHWM``, each method in its
own freshly spawned process; beside it the peak of a process that runs the same code on
200 rows) are printed as a table and written as JSON.

    python benchmarks/stochastic_large.py [--n 1000000] [--d 20] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DT = torch.float64
TARGET = 1e-2


# ---------------------------------------------------------------- the problem
def make_chunk(c: int, chunk: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``c·chunk .. (c+1)·chunk − 1`` of the training set (features of unequal scale)."""
    g = torch.Generator().manual_seed(seed * 1_000_000 + c)
    w_true = torch.linspace(-1.0, 1.0, d, dtype=DT)
    scale = torch.linspace(0.5, 1.5, d, dtype=DT)
    X = torch.randn(chunk, d, generator=g, dtype=DT) * scale
    y = torch.sign(X @ w_true + 0.5 * torch.randn(chunk, generator=g, dtype=DT))
    return X, y


def make_validation(n_val: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return make_chunk(10**6 - 1, n_val, d, seed + 7)  # a block no training chunk uses


def hparams0(d: int) -> torch.Tensor:
    return torch.linspace(-6.0, -2.0, d, dtype=DT)  # penalties e^λ from 2.5e-3 to 0.14


def data_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(-y * (X @ w)).mean()


class ChunkedBatches(torch.utils.data.IterableDataset):
    """One epoch of minibatches: chunks in a shuffled order, rows shuffled within a chunk.

    Re-iterable (a new epoch, a new order, each time); wrapped in a DataLoader with
    ``batch_size=None`` it is fed to :func:`bilevel.sid` as is.
    """

    def __init__(self, n: int, d: int, chunk: int, batch: int, seed: int):
        super().__init__()
        if n % chunk or chunk % batch:
            raise ValueError(f"chunk ({chunk}) should divide n ({n}) and batch ({batch}) divide chunk.")
        self.n, self.d, self.chunk, self.batch, self.seed = n, d, chunk, batch, seed
        self.epoch = 0
        self.gen_seconds = 0.0  # time spent generating ("reading") chunks

    def __iter__(self):
        g = torch.Generator().manual_seed(10_000 * self.seed + self.epoch)
        self.epoch += 1
        for c in torch.randperm(self.n // self.chunk, generator=g).tolist():
            t0 = time.perf_counter()
            X, y = make_chunk(c, self.chunk, self.d, self.seed)
            self.gen_seconds += time.perf_counter() - t0
            perm = torch.randperm(self.chunk, generator=g)
            for i in range(0, self.chunk, self.batch):
                idx = perm[i:i + self.batch]
                yield X[idx], y[idx]


def full_data(n: int, d: int, chunk: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training set as one dense ``n × d`` matrix (the deterministic path only)."""
    X, y = torch.empty(n, d, dtype=DT), torch.empty(n, dtype=DT)
    for c in range(n // chunk):  # filled in place: no second copy while building it
        X[c * chunk:(c + 1) * chunk], y[c * chunk:(c + 1) * chunk] = make_chunk(c, chunk, d, seed)
    return X, y


def exact_reference(n: int, d: int, chunk: int, seed: int, n_val: int) -> dict[str, Any]:
    """Newton's method on the full data to machine precision, then the exact hypergradient."""
    lam = hparams0(d)
    X, y = full_data(n, d, chunk, seed)
    w = torch.zeros(d, dtype=DT)
    for _ in range(30):
        s = torch.sigmoid(-y * (X @ w))
        grad = X.T @ (-y * s) / n + lam.exp() * w
        hess = (X * (s * (1 - s))[:, None]).T @ X / n + torch.diag(lam.exp())
        if float(grad.norm()) < 1e-14:
            break
        w = w - torch.linalg.solve(hess, grad)  # strongly convex and smooth: full steps converge here
    Xv, yv = make_validation(n_val, d, seed)
    gw = torch.func.grad(data_loss)(w, Xv, yv)
    hg = -lam.exp() * w * torch.linalg.solve(hess, gw)
    eig = torch.linalg.eigvalsh(hess)
    return {"params": w, "hypergrad": hg, "grad_norm": float(grad.norm()), "hess_eig": (float(eig[0]), float(eig[-1]))}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- the two methods
def run_sid(cfg: dict[str, Any], exact: torch.Tensor, lipschitz: float) -> dict[str, Any]:
    """SID (inner_loss form: SGD, then Richardson on Ĥ v = ∇f) up a ladder of budgets."""
    import bilevel as bl

    d, lam = cfg["d"], hparams0(cfg["d"])
    Xv, yv = make_validation(cfg["n_val"], d, cfg["seed"])

    def inner_loss(w, lam, batch):
        X, y = batch
        return data_loss(w, X, y) + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(w, lam, batch):  # the validation set is small: deterministic
        return data_loss(w, Xv, yv)

    eta = 1.0 / lipschitz
    rungs = []
    for batch, steps in cfg["sid_ladder"]:
        data = ChunkedBatches(cfg["n"], d, cfg["chunk"], batch, cfg["seed"])
        loader = torch.utils.data.DataLoader(data, batch_size=None)
        t0 = time.perf_counter()
        # constant steps 1/L with minibatches (JMLR 2023): the bias falls like q^t, the
        # noise floor like 1/batch; the ladder grows both
        hg, info = bl.sid(outer_loss, torch.zeros(d, dtype=DT), lam, loader, inner_loss=inner_loss,
                          outer_batches=[None], inner_steps=steps, linear_steps=steps, hparam_batches=4,
                          inner_step_size=eta, linear_step_size=eta, return_info=True)
        dt = time.perf_counter() - t0
        rungs.append({"batch": batch, "steps": steps, "seconds": dt, "solve_seconds": dt - data.gen_seconds,
                      "rel_err": rel_err(hg, exact), "samples": info.samples, "epochs": info.samples / cfg["n"]})
        if rungs[-1]["rel_err"] <= TARGET:
            break
    return {"rungs": rungs}


def run_aid(cfg: dict[str, Any], exact: torch.Tensor, lipschitz: float) -> dict[str, Any]:
    """Deterministic AID on the dense full data: T gradient steps, then CG on H v = ∇f."""
    import bilevel as bl

    d, n, lam = cfg["d"], cfg["n"], hparams0(cfg["d"])
    t0 = time.perf_counter()
    X, y = full_data(n, d, cfg["chunk"], cfg["seed"])
    gen_seconds = time.perf_counter() - t0
    Xv, yv = make_validation(cfg["n_val"], d, cfg["seed"])

    def inner_loss(w, lam):
        return data_loss(w, X, y) + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(w, lam):
        return data_loss(w, Xv, yv)

    grad_w = torch.func.grad(inner_loss)
    eta = 1.0 / lipschitz
    rungs = []
    for steps in cfg["aid_ladder"]:
        t0 = time.perf_counter()
        w = torch.zeros(d, dtype=DT)
        for _ in range(steps):
            w = w - eta * grad_w(w, lam)
        hg, info = bl.hypergrad(outer_loss, w, lam, inner_loss=inner_loss, solver=bl.CG(maxiter=100, tol=1e-4),
                                return_info=True)
        dt = time.perf_counter() - t0
        rungs.append({"steps": steps, "cg_iterations": info.iterations, "seconds": dt + gen_seconds,
                      "solve_seconds": dt, "rel_err": rel_err(hg, exact), "epochs": steps + info.iterations + 2})
        if rungs[-1]["rel_err"] <= TARGET:
            break
    return {"rungs": rungs, "generate_seconds": gen_seconds}


def _idle(cfg: dict[str, Any], exact: torch.Tensor, lipschitz: float) -> dict[str, Any]:
    """The same imports and code paths on 2 chunks of 100 rows: the memory that is not data."""
    tiny = {**cfg, "n": 200, "chunk": 100, "n_val": 100, "sid_ladder": [(100, 5)], "aid_ladder": [5]}
    run_sid(tiny, exact, lipschitz)
    run_aid(tiny, exact, lipschitz)
    return {}


def peak_rss_mb() -> float:
    """Peak resident memory of this process image: VmHWM (reset by exec, unlike ru_maxrss,
    which a spawned child inherits from its parent); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _worker(name: str, cfg: dict[str, Any], exact: torch.Tensor, lipschitz: float, queue: Any) -> None:
    torch.set_num_threads(cfg["threads"])
    out = {"_idle": _idle, "sid": run_sid, "aid": run_aid}[name](cfg, exact, lipschitz)
    out["peak_rss_mb"] = peak_rss_mb()
    queue.put(out)


def in_fresh_process(name: str, cfg: dict[str, Any], exact: torch.Tensor, lipschitz: float) -> dict[str, Any]:
    """Run one method in a spawned process, so that its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(name, cfg, exact, lipschitz, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"the {name} process failed (exit code {proc.exitcode}).")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10**6, help="training rows (default 10^6)")
    p.add_argument("--d", type=int, default=20, help="features = hyperparameters")
    p.add_argument("--chunk", type=int, default=10**4, help="rows per stored chunk")
    p.add_argument("--n-val", type=int, default=10**4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="n = 2·10^4: a smoke run of a few seconds")
    p.add_argument("--out", default="benchmarks/results/stochastic_large.json")
    args = p.parse_args(argv)
    threads = _common.configure_threads(args.threads)
    n, chunk = (2 * 10**4, 2000) if args.quick else (args.n, args.chunk)
    cfg = {
        "n": n, "d": args.d, "chunk": chunk, "n_val": args.n_val, "seed": args.seed, "threads": args.threads,
        # (batch, inner = linear steps) and full-batch gradient steps, cheapest first
        "sid_ladder": [(b, s) for b, s in ((1000, 100), (1000, 200), (2000, 300), (5000, 300), (10000, 400),
                                           (10000, 800)) if chunk % b == 0],
        "aid_ladder": [25, 50, 100, 200, 400, 800],
    }
    t0 = time.perf_counter()
    ref = exact_reference(n, args.d, chunk, args.seed, args.n_val)
    ref_seconds = time.perf_counter() - t0
    # L of the gradient step: the largest eigenvalue of the Hessian at w = 0 bounds it (σ' ≤ 1/4 there)
    X0, _ = make_chunk(0, chunk, args.d, args.seed)
    lipschitz = float(torch.linalg.eigvalsh(X0.T @ X0 / chunk).max()) / 4 + float(hparams0(args.d).exp().max())
    idle = in_fresh_process("_idle", cfg, ref["hypergrad"], lipschitz)
    sid = in_fresh_process("sid", cfg, ref["hypergrad"], lipschitz)
    aid = in_fresh_process("aid", cfg, ref["hypergrad"], lipschitz)

    def reached(res: dict[str, Any]) -> dict[str, Any] | None:
        last = res["rungs"][-1]
        return last if last["rel_err"] <= TARGET else None

    rows = []
    for name, res, what in (("SID (DataLoader, chunks)", sid, "batch {batch}, t=k={steps}"),
                            ("AID (dense full data)", aid, "T={steps}, CG {cg_iterations}")):
        best = reached(res) or res["rungs"][-1]
        rows.append([name, what.format(**best), best["rel_err"], best["solve_seconds"], best["seconds"],
                     best["epochs"], res["peak_rss_mb"], res["peak_rss_mb"] - idle["peak_rss_mb"],
                     "yes" if reached(res) else "no"])
    print(f"per-feature L2 logistic regression: n={n:,} rows x d={args.d}, validation {args.n_val:,}; "
          f"exact reference by Newton in {ref_seconds:.1f}s (|grad g| = {ref['grad_norm']:.1e}); "
          f"threads={args.threads}")
    print(_common.format_table(
        ["method", "budget", "rel err", "solve s", "with data s", "data passes", "peak RSS MB", "over idle MB",
         f"<= {TARGET:g}"], rows))
    print(f"'solve s' leaves out generating the data ('reading' it: SID regenerates each chunk it visits, AID "
          f"generates its dense {n:,} x {args.d} matrix, {n * args.d * 8 / 2**20:.0f} MB, once: "
          f"{aid['generate_seconds']:.1f}s); 'with data s' counts it. Idle process: {idle['peak_rss_mb']:.0f} MB.")
    s, a = reached(sid), reached(aid)
    if s and a:
        over_s = max(sid["peak_rss_mb"] - idle["peak_rss_mb"], 1.0)
        print(f"to rel err <= {TARGET:g}: SID/AID time {s['solve_seconds'] / a['solve_seconds']:.2f} (solve), "
              f"{s['seconds'] / a['seconds']:.2f} (with data); data passes {s['epochs'] / a['epochs']:.3f}; "
              f"memory over idle {over_s:.0f} MB vs {aid['peak_rss_mb'] - idle['peak_rss_mb']:.0f} MB.")
    payload = {
        "config": cfg, "target_rel_err": TARGET, "reference_seconds": ref_seconds,
        "reference_hess_eig": ref["hess_eig"], "idle": idle, "sid": sid, "aid": aid,
        "machine": _common.machine_info(threads),
    }
    print(f"wrote {_common.write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel hypergradients: time per hypergradient on 1, 2, ... processes (gloo, CPU).

The problem (per-feature L2 logistic regression, n training and n/2 validation rows, d
features, split in contiguous shards across the ranks)::

    inner  g(w, λ) = mean_i log(1 + exp(−y_i x_iᵀw)) + ½ Σ_j e^{λ_j} w_j²
    outer  f(w)    = the same data loss on the validation rows

Per world size W (W processes, one thread each, spawned here on 127.0.0.1):

* AID: ``hypergrad(outer, w, λ, inner_loss=inner, solver=CG(maxiter=K, tol=0))`` — exactly
  K Hessian–vector products — at the inner solution (``newton_cg``, not timed);
* ITD: T gradient steps ``w ← w − η ∇g`` from 0 through ``unroll`` and one backward pass
  (the step itself wrapped: one all-reduce of its value per step, not one for ``g`` and
  one for ``∇g``).

Both with the functions wrapped by :func:`bilevel.distributed.data_parallel`; W = 1 is also
timed with the plain (unwrapped) losses and no process group, the overhead baseline.  A
time is the slowest rank's (all-reduce MAX), the median of ``--repeats`` runs after one
warm-up run.  Bytes all-reduced per hypergradient: counted, per rank, on every collective
``data_parallel`` makes (values, derivatives and its consistency checks).  Each result is
compared with the one-process result (relative error).

    python benchmarks/distributed.py                          # W = 1, 2;  n×d = 40000×200
    python benchmarks/distributed.py --worlds 1 2 4 --n 100000 --d 500 --out r.json
    python benchmarks/distributed.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import bilevel
import bilevel.distributed as bd

ETA = 0.5


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="numbers of processes")
    ap.add_argument("--n", type=int, default=40000, help="training rows (validation: n/2)")
    ap.add_argument("--d", type=int, default=200, help="features (= |w| = |λ|)")
    ap.add_argument("--cg", type=int, default=20, help="K: CG iterations of AID")
    ap.add_argument("--itd", type=int, default=20, help="T: unrolled steps of ITD")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--out", default="benchmarks/results/distributed.json")
    ap.add_argument("--quick", action="store_true", help="n×d = 4000×50, 3 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.d, args.repeats = 4000, 50, 3
    return args


def full_data(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    m = args.n + args.n // 2
    X = torch.randn(m, args.d, generator=g, dtype=torch.float64)
    noise = torch.randn(m, generator=g, dtype=torch.float64)
    y = torch.sign(X @ torch.randn(args.d, generator=g, dtype=torch.float64) + noise)
    X, y = X.to(dtype), y.to(dtype)
    lam = torch.full((args.d,), -2.0, dtype=dtype)
    return X[: args.n], y[: args.n], X[args.n :], y[args.n :], lam


def losses(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor):
    def inner_loss(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return F.softplus(-y * (X @ w)).mean() + 0.5 * (lam.exp() * w * w).sum()

    def outer_loss(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return F.softplus(-yv * (Xv @ w)).mean()

    return inner_loss, outer_loss


class Counter:
    """Counts what ``bilevel.distributed`` all-reduces (wraps its one collective helper).

    Bytes are the buffer sizes each rank hands to the all-reduce (what a ring all-reduce
    sends is about 2·(W−1)/W times that); one process all-reduces nothing.
    """

    def __init__(self, world: int) -> None:
        self.calls = 0
        self.bytes = 0
        self.world = world
        self._inner = bd._all_reduce

    def __call__(self, buf: torch.Tensor, op: Any, group: Any, *what: str) -> None:
        if self.world > 1:
            self.calls += 1
            self.bytes += buf.numel() * buf.element_size()
        self._inner(buf, op, group, *what)

    def reset(self) -> None:
        self.calls = self.bytes = 0


def _methods(local_inner, local_outer, n_train: int, n_val: int, wrap, w: torch.Tensor, lam: torch.Tensor,
             args: argparse.Namespace):
    """AID-CG and ITD on the local functions, each wrapped by ``wrap(fn, n_local)``."""
    inner, outer = wrap(local_inner, n_train), wrap(local_outer, n_val)

    def aid() -> torch.Tensor:
        return bilevel.hypergrad(outer, w, lam, inner_loss=inner, solver=bilevel.CG(maxiter=args.cg, tol=0))

    def local_step(v: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
        return v - ETA * torch.func.grad(local_inner)(v, lm)

    # ITD wraps the whole step: Σ_r (n_r/N)(w − η∇g_r) = w − η∇g, one value all-reduce per
    # step instead of one for the loss and one for its gradient
    step = wrap(local_step, n_train)

    def itd() -> torch.Tensor:
        lr = lam.clone().requires_grad_()
        wT = bilevel.unroll(step, torch.zeros_like(w), lr, args.itd)
        return torch.autograd.grad(outer(wT, lr), lr)[0]

    return {"AID-CG": aid, "ITD": itd}


def _time(fn, repeats: int, sync) -> tuple[float, list[float], torch.Tensor]:
    out = fn()  # warm-up (and the value)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def run_rank(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
        X, y, Xv, yv, lam = full_data(args)
        Xs, ys = bd.shard(X, y)
        Xvs, yvs = bd.shard(Xv, yv)
        del X, y, Xv, yv
        li, lo = losses(Xs, ys, Xvs, yvs)
        w, _ = bilevel.newton_cg(bd.data_parallel(li, len(ys)), torch.zeros_like(lam), lam, tol=1e-12)
        counter = Counter(world)
        bd._all_reduce = counter  # count every collective data_parallel makes from here on
        result: dict[str, Any] = {}
        for name, fn in _methods(li, lo, len(ys), len(yvs), bd.data_parallel, w, lam, args).items():
            med, times, hg = _time(fn, args.repeats, lambda: dist.barrier())
            counter.reset()
            fn()
            slowest = torch.tensor([med] + times, dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # (not counted: bookkeeping)
            result[name] = {"median_s": slowest[0].item(), "times_s": slowest[1:].tolist(),
                            "allreduce_calls": counter.calls, "allreduce_bytes": counter.bytes,
                            "hypergrad": hg.double().tolist()}
        queue.put((rank, result))
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, {"crash": traceback.format_exc()}))


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    """One process, no process group, unwrapped losses: the baseline without any collective."""
    torch.set_num_threads(1)
    X, y, Xv, yv, lam = full_data(args)
    inner, outer = losses(X, y, Xv, yv)
    w, _ = bilevel.newton_cg(inner, torch.zeros_like(lam), lam, tol=1e-12)
    out = {}
    for name, fn in _methods(inner, outer, len(y), len(yv), lambda f, n: f, w, lam, args).items():
        med, times, hg = _time(fn, args.repeats, lambda: None)
        out[name] = {"median_s": med, "times_s": times, "allreduce_calls": 0, "allreduce_bytes": 0,
                     "hypergrad": hg.double().tolist()}
    return out


def run_world(world: int, args: argparse.Namespace) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=run_rank, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    for r, res in results.items():
        if "crash" in res:
            raise RuntimeError(f"rank {r} of {world} failed:\n{res['crash']}")
    return results[0]


def rel_err(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((ta - tb).norm() / tb.norm())


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_start = time.time()
    rows: list[dict[str, Any]] = []
    runs = {"plain": run_plain(args)}
    for world in args.worlds:
        runs[world] = run_world(world, args)
    base = runs[1] if 1 in runs else None
    for key, res in runs.items():
        for method, r in res.items():
            ref1 = base[method]["median_s"] if base else float("nan")
            rows.append({
                "method": method,
                "processes": 1 if key == "plain" else key,
                "data_parallel": key != "plain",
                "median_s": r["median_s"],
                "min_s": min(r["times_s"]),
                "times_s": r["times_s"],
                "speedup_vs_1": ref1 / r["median_s"],
                "speedup_vs_plain": runs["plain"][method]["median_s"] / r["median_s"],
                "allreduce_calls": r["allreduce_calls"],
                "allreduce_bytes": r["allreduce_bytes"],
                "rel_err_vs_plain": rel_err(r["hypergrad"], runs["plain"][method]["hypergrad"]),
            })
    info = {
        "problem": {"n_train": args.n, "n_val": args.n // 2, "d": args.d, "K_cg": args.cg, "T_itd": args.itd,
                    "dtype": args.dtype, "backend": "gloo (loopback)", "threads_per_process": 1},
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_at_end": os.getloadavg()},
        "seconds": time.time() - t_start,
        "rows": rows,
    }
    print(table(rows, args))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2))
        print(f"JSON: {path}")
    return 0


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (f"n×d = {args.n}×{args.d} ({args.dtype}), AID: CG K={args.cg}, ITD: T={args.itd}; gloo on "
            f"loopback, 1 thread per process; median and min of {args.repeats}; speedup (of the medians) "
            "vs 1 wrapped process and vs the plain functions without a process group")
    cols = f"{'method':8} {'procs':>5} {'wrapped':>7} {'median s':>10} {'min s':>8} {'speedup':>8} {'vs plain':>8} " \
           f"{'all-reduces':>11} {'bytes/hypergrad':>15} {'rel. err':>9}"
    lines = [head, cols, "-" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["method"], r["processes"], r["data_parallel"])):
        lines.append(
            f"{r['method']:8} {r['processes']:>5} {('yes' if r['data_parallel'] else 'no'):>7} "
            f"{r['median_s']:>10.4f} {r['min_s']:>8.4f} {r['speedup_vs_1']:>8.2f} {r['speedup_vs_plain']:>8.2f} "
            f"{r['allreduce_calls']:>11} {r['allreduce_bytes']:>15,} {r['rel_err_vs_plain']:>9.1e}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

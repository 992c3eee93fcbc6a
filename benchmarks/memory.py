"""Peak memory of the hypergradient methods as the number of inner steps T grows (issue 7).

The problem is ``logreg.py``'s per-feature-L2 logistic regression (``make_data`` and
``torch_problem`` imported from there), with many features and few rows so that the state
w (and one λ per feature) is large: d = 2^16 in float64, 0.5 MiB per vector, n = 16::

    inner  g(w, λ) = mean_i log(1 + exp(−y_i x_iᵀw)) + ½ Σ_j e^{λ_j} w_j²
    outer  f(w)    = the same data loss on a validation set (n/2 rows)

Inner solver: T gradient-descent steps ``w ← w − η ∇_w g`` from ``w = 0``.  Methods:

* ``AID-CG``: the T steps without a graph, then ``bilevel.hypergrad(f, w_T, λ,
  inner_loss=g, solver=CG(K, tol=0))``.  Claim: peak flat in T (within 5%).
* ``ITD truncated``: ``bilevel.unroll(step, 0, λ, T, truncate=K_tr)`` then
  ``torch.autograd.grad``.  Claim: flat in T (within 5%).
* ``ITD full``: ``bilevel.unroll(step, 0, λ, T)``: the whole graph, O(T) memory.
* ``ITD checkpoint``: ``unroll(..., checkpoint=True)``: √T stored states and one segment
  of √T steps recomputed at a time, O(√T).  Claim: fitted exponent of peak vs T ≤ 0.6;
  its hypergradient equals full ITD's (checked where both run at the same T).

Each (method, T) runs alone in a new process (forked on CPU, spawned for CUDA), so peaks
never mix.  In it: build the data and the problem, run the method once at 2 steps on a
16-feature copy (one-time costs such as lazy imports are not counted), then take the
baseline and measure the peak of the whole run (inner solve + hypergradient) above it:

* CPU, peak RSS: ``malloc_trim(0)`` (free heap pages back to the kernel, else the run
  reuses them unseen), write "5" to ``/proc/self/clear_refs`` (resets the kernel's
  high-water mark VmHWM to the current RSS), read VmRSS as the baseline, run, peak =
  VmHWM − baseline.  Where clear_refs cannot be written: peak = ``ru_maxrss`` − baseline
  RSS, an underestimate if the process was ever larger before the baseline (noted).
  ``--malloc fixed`` (default) first fixes glibc's mmap threshold at 64 KiB, so that every
  tensor of the size of w is its own mapping, returned when freed: RSS then follows the
  tensor memory, page-exact, to about ±0.1 MiB from run to run.  ``--malloc default``
  keeps glibc's adaptive threshold, what a plain process shows: big tensors come from the
  heap, where torch's 64-byte-aligned requests do not always fit the holes freed ones
  leave, so RSS adds fragmentation that varies by ±20% with the history of the run.
* CUDA (``--device cuda``): ``torch.cuda.reset_peak_memory_stats`` at the baseline, peak =
  ``max_memory_allocated`` − ``memory_allocated`` at the baseline.  Without CUDA the run is
  skipped with a note.

    python benchmarks/memory.py                  # T up to 10000 (AID, truncated), 400 (full, checkpoint)
    python benchmarks/memory.py --quick          # a few small T: seconds
    python benchmarks/memory.py --device cuda --out benchmarks/results/memory_cuda.json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import math
import multiprocessing as mp
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _common import configure_threads, format_table, machine_info, write_json
from logreg import gd, make_data, torch_problem

import bilevel

METHODS = ("AID-CG", "ITD truncated", "ITD full", "ITD checkpoint")
FLAT_TOL = 0.05  # AID and truncated ITD: peak(T_max) / peak(T_min) within 5%
CHECKPOINT_MAX_EXPONENT = 0.6  # √T memory: fitted exponent ~0.5
FULL_MIN_EXPONENT = 0.8  # full ITD: linear in T (a sanity check that growth is visible)
SAME_AS_FULL_TOL = {"float64": 1e-12, "float32": 1e-5}  # checkpointed vs full ITD hypergradient
MIB = 2**20
MMAP_THRESHOLD = 64 * 1024  # --malloc fixed: every tensor of ≥ 64 KiB is its own mapping
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Config:
    """One measured run: a method at T inner steps on an n×d problem."""

    method: str
    T: int
    n: int
    d: int
    dtype: str
    device: str
    eta: float
    cg_iters: int
    truncate: int
    seed: int
    threads: int
    malloc: str  # "fixed": glibc mmap threshold fixed at MMAP_THRESHOLD; "default": as glibc starts


def hypergradient(prob: Any, cfg: Config, T: int) -> torch.Tensor:
    """The inner solve and the hypergradient ∇F(λ) of ``cfg.method`` with T steps."""
    zeros = torch.zeros_like(prob.lam)
    if cfg.method == "AID-CG":
        w_T = gd(prob, zeros, prob.lam, T)
        solver = bilevel.CG(maxiter=cfg.cg_iters, tol=0.0)
        return bilevel.hypergrad(prob.outer_loss, w_T, prob.lam, inner_loss=prob.inner_loss, solver=solver,
                                 inner_tol=math.inf)  # w_T after T steps: inexact on purpose
    options = {
        "ITD truncated": {"truncate": min(cfg.truncate, T)},
        "ITD full": {},
        "ITD checkpoint": {"checkpoint": True},
    }[cfg.method]
    lam = prob.lam.detach().requires_grad_()
    w_T = bilevel.unroll(prob.step, zeros, lam, T, **options)
    return torch.autograd.grad(prob.outer_loss(w_T, lam), lam)[0]


def _status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold() -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, 64 KiB)``: each allocation of ≥ 64 KiB gets its own
    mapping, unmapped when freed, and the threshold no longer adapts.  RSS then follows the
    bytes the tensors hold; with the default (adaptive) threshold the big tensors come from
    the heap, where freed holes of one size are not always reusable (torch allocates with
    64-byte alignment), and RSS also counts that fragmentation, which varies from run to
    run.  False where there is no glibc."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_free_memory() -> bool:
    """glibc ``malloc_trim(0)``: hand the allocator's free pages back to the kernel.

    Without it the baseline RSS holds memory freed while the data were built, which the
    run then reuses without raising RSS: its peak would read too low.  False where there
    is no glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


class RSSMeter:
    """Peak resident set size above a baseline (see the module docstring)."""

    def __init__(self) -> None:
        release_free_memory()
        self.how = "clear_refs"
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.how = "ru_maxrss"
        self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.how == "clear_refs":
            return _status_kib("VmHWM") * 1024 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


class CudaMeter:
    """Peak of the caching allocator's allocated bytes above a baseline."""

    how = "cuda max_memory_allocated"

    def __init__(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


def build_problem(cfg: Config, d: int) -> Any:
    data = make_data(cfg.n, d, cfg.seed)
    prob = torch_problem(data, getattr(torch, cfg.dtype), cfg.eta)
    if cfg.device != "cpu":
        prob = type(prob)(*(t.to(cfg.device) for t in (prob.X, prob.y, prob.Xv, prob.yv, prob.lam)), prob.eta)
    return prob


def measure(cfg: Config) -> dict[str, Any]:
    """Warm up on a tiny copy, take the baseline, run once; peak bytes and seconds."""
    torch.set_num_threads(cfg.threads)
    fixed = cfg.malloc == "fixed" and cfg.device == "cpu" and fix_mmap_threshold()
    hypergradient(build_problem(cfg, 16), cfg, 2)  # one-time costs: lazy imports, first autograd use
    prob = build_problem(cfg, cfg.d)
    gc.collect()
    meter = CudaMeter() if cfg.device == "cuda" else RSSMeter()
    t0 = time.perf_counter()
    hg = hypergradient(prob, cfg, cfg.T)
    peak = meter.peak()
    seconds = time.perf_counter() - t0
    how = meter.how + (", malloc mmap threshold 64 KiB" if fixed else "")
    return {"peak_bytes": peak, "seconds": seconds, "how": how, "hypergrad": hg.detach().cpu().numpy()}


def _child(cfg: Config, conn: Any) -> None:
    try:  # numpy, not torch: torch would pass the tensor as shared memory of the exiting child
        conn.send(measure(cfg))
    except Exception as err:  # reported in the table; the other runs go on
        conn.send({"error": f"{type(err).__name__}: {err}"})
    finally:
        conn.close()


def run_alone(cfg: Config) -> dict[str, Any]:
    """``measure(cfg)`` in a new process.  Fork on CPU (fast, no second torch import; the
    child's baseline is its own); spawn for CUDA, which must not be initialised before a fork."""
    ctx = mp.get_context("spawn" if cfg.device == "cuda" else "fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(cfg, send))
    proc.start()
    send.close()
    try:
        out = recv.recv()
    except EOFError:  # the child died without answering (e.g. killed for memory)
        out = {"error": "the process ended without a result"}
    proc.join()
    if proc.exitcode not in (0, None) and "error" not in out:
        out["error"] = f"exit code {proc.exitcode}"
    return out


# --------------------------------------------------------------------------- analysis


def fitted_exponent(Ts: list[int], peaks: list[float]) -> float:
    """Least-squares slope of log(peak) against log(T): peak ∝ T^slope."""
    if len(Ts) < 2 or min(peaks) <= 0:
        return math.nan
    x = [math.log(t) for t in Ts]
    y = [math.log(p) for p in peaks]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: peak(T_max)/peak(T_min) and the fitted exponent."""
    out = {}
    for method in METHODS:
        ok = sorted((r for r in rows if r["method"] == method and "error" not in r), key=lambda r: r["T"])
        if len(ok) < 2:
            continue
        Ts, peaks = [r["T"] for r in ok], [float(r["peak_bytes"]) for r in ok]
        out[method] = {
            "T_min": Ts[0], "T_max": Ts[-1],
            "ratio": peaks[-1] / peaks[0] if peaks[0] > 0 else math.nan,
            "exponent": fitted_exponent(Ts, peaks),
        }
    return out


def checkpoint_vs_full(hgs: dict[tuple[str, int], torch.Tensor]) -> float:
    """Largest max-norm relative difference of checkpointed vs full ITD at a T both ran."""
    shared = [T for method, T in hgs if method == "ITD checkpoint" and ("ITD full", T) in hgs]
    diffs = [
        ((hgs[("ITD checkpoint", T)] - hgs[("ITD full", T)]).abs().max() / hgs[("ITD full", T)].abs().max()).item()
        for T in shared
    ]
    return max(diffs) if diffs else math.nan


def claims(summary: dict[str, dict[str, Any]], same: float, same_tol: float = 1e-12) -> list[dict[str, Any]]:
    """The issue's claims, each with the measured value and PASS/MISS (None: not measured)."""

    def get(method: str, key: str) -> float:
        return summary.get(method, {}).get(key, math.nan)

    def verdict(value: float, ok: bool) -> bool | None:
        return None if math.isnan(value) else ok

    aid, trunc = get("AID-CG", "ratio"), get("ITD truncated", "ratio")
    ck, full = get("ITD checkpoint", "exponent"), get("ITD full", "exponent")
    return [
        {"claim": f"AID-CG peak flat in T (ratio within {FLAT_TOL:.0%})", "value": aid,
         "pass": verdict(aid, abs(aid - 1) <= FLAT_TOL)},
        {"claim": f"truncated ITD peak flat in T (ratio within {FLAT_TOL:.0%})", "value": trunc,
         "pass": verdict(trunc, abs(trunc - 1) <= FLAT_TOL)},
        {"claim": f"checkpointed ITD peak O(sqrt T) (exponent <= {CHECKPOINT_MAX_EXPONENT})", "value": ck,
         "pass": verdict(ck, ck <= CHECKPOINT_MAX_EXPONENT)},
        {"claim": f"full ITD peak grows linearly (exponent >= {FULL_MIN_EXPONENT})", "value": full,
         "pass": verdict(full, full >= FULL_MIN_EXPONENT)},
        {"claim": f"checkpointed ITD hypergradient = full ITD's (max rel. diff <= {same_tol:g})",
         "value": same, "pass": verdict(same, same <= same_tol)},
    ]


# --------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]], wbytes: int) -> str:
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["method"], r["T"], "failed", "-", "-"])
        else:
            body.append([r["method"], r["T"], r["peak_bytes"] / MIB, r["peak_bytes"] / wbytes, r["seconds"]])
    return format_table(["method", "T", "peak MiB", "peak / |w|", "seconds"], body)


def summary_lines(summary: dict[str, dict[str, Any]], checks: list[dict[str, Any]]) -> list[str]:
    lines = []
    for method, s in summary.items():
        lines.append(
            f"{method:15s} peak(T={s['T_max']}) / peak(T={s['T_min']}) = {s['ratio']:.3f}, "
            f"fitted exponent {s['exponent']:.2f}"
        )
    for c in checks:
        word = {True: "PASS", False: "MISS", None: "SKIP"}[c["pass"]]
        value = "not measured" if math.isnan(c["value"]) else f"{c['value']:.3g}"
        lines.append(f"{word}  {c['claim']}: {value}")
    return lines


# --------------------------------------------------------------------------- CLI


def parse_ints(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"steps should be >= 1, not {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="training rows (default 16; validation n/2)")
    p.add_argument("--d", type=int, default=2**16, help="features = |w| = |λ| (default 2^16)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--aid-steps", type=parse_ints, default=None,
                   help="T for AID-CG and truncated ITD (default 100,1000,10000; --quick 10,100)")
    p.add_argument("--full-steps", type=parse_ints, default=None,
                   help="T for full ITD (default 25,100,400; --quick 8,32)")
    p.add_argument("--checkpoint-steps", type=parse_ints, default=None,
                   help="T for checkpointed ITD (default 25,100,400; --quick 8,32,64)")
    p.add_argument("--truncate", type=int, default=None, help="steps kept by truncated ITD (default 50; --quick 8)")
    p.add_argument("--cg-iters", type=int, default=30, help="CG iterations of AID (tol=0: exactly these)")
    p.add_argument("--step", type=float, default=0.5, help="GD step size η (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each run (default 1)")
    p.add_argument("--malloc", choices=["fixed", "default"], default="fixed",
                   help="CPU: glibc mmap threshold fixed at 64 KiB (RSS = tensor memory; default) or glibc's "
                        "adaptive default (RSS includes heap fragmentation)")
    p.add_argument("--quick", action="store_true", help="a few small T: seconds")
    p.add_argument("--out", default="benchmarks/results/memory.json", help="JSON output path")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "aid_steps": [10, 100] if quick else [100, 1000, 10000],
        "full_steps": [8, 32] if quick else [25, 100, 400],
        "checkpoint_steps": [8, 32, 64] if quick else [25, 100, 400],
        "truncate": 8 if quick else 50,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.n < 4 or args.d < 1 or args.truncate < 1 or args.cg_iters < 1:
        p.error("need --n >= 4, --d >= 1, --truncate >= 1, --cg-iters >= 1")
    return args


def configs(args: argparse.Namespace) -> list[Config]:
    steps = {
        "AID-CG": args.aid_steps, "ITD truncated": args.aid_steps,
        "ITD full": args.full_steps, "ITD checkpoint": args.checkpoint_steps,
    }
    return [
        Config(m, T, args.n, args.d, args.dtype, args.device, args.step, args.cg_iters, args.truncate,
               args.seed, args.threads, args.malloc)
        for m in METHODS for T in steps[m]
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = configure_threads(args.threads)
    notes: list[str] = list(threads["notes"])
    wbytes = args.d * torch.finfo(getattr(torch, args.dtype)).bits // 8
    rows: list[dict[str, Any]] = []
    hgs: dict[tuple[str, int], torch.Tensor] = {}
    if args.device == "cuda" and not torch.cuda.is_available():
        notes.append("CUDA is not available on this machine: the CUDA measurement was skipped.")
    else:
        for cfg in configs(args):
            print(f"{cfg.method} T={cfg.T} ...", file=sys.stderr, flush=True)
            out = run_alone(cfg)
            row = {"method": cfg.method, "T": cfg.T}
            if "error" in out:
                row["error"] = out["error"]
                notes.append(f"{cfg.method} T={cfg.T} failed: {out['error']}")
            else:
                hgs[(cfg.method, cfg.T)] = torch.from_numpy(out.pop("hypergrad"))
                row.update(out)
                row["peak_mib"] = out["peak_bytes"] / MIB
            rows.append(row)
    hows = sorted({r["how"] for r in rows if "how" in r})
    if any("ru_maxrss" in h for h in hows):
        notes.append("/proc/self/clear_refs could not be written: peaks are ru_maxrss - baseline RSS "
                     "(an underestimate if a process was larger before its baseline).")
    summary = summarize(rows)
    checks = claims(summary, checkpoint_vs_full(hgs), SAME_AS_FULL_TOL[args.dtype])
    head = (f"n={args.n} d={args.d} ({wbytes / MIB:.3g} MiB per vector)  {args.dtype}  {args.device}  "
            f"η={args.step}  CG {args.cg_iters} it.  truncate={args.truncate}  threads={args.threads}\n"
            f"peak above the baseline: {', '.join(hows) or '-'}")
    print("\n" + head)
    if rows:
        print(table(rows, wbytes))
    print("\n".join(summary_lines(summary, checks)))
    for note in notes:
        print(f"note: {note}")
    payload = {
        "benchmark": "memory",
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "vector_bytes": wbytes},
        "measure": hows,
        "machine": machine_info(threads),
        "notes": notes,
        "results": rows,
        "summary": summary,
        "claims": checks,
        "configs": [asdict(c) for c in configs(args)],
    }
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

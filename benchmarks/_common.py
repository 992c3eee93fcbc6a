"""Shared benchmark plumbing: thread limits, timing, machine description, table, JSON.

Nothing here knows about a particular problem; ``logreg.py`` (and later benchmarks) build
on it.  :func:`configure_threads` must run before ``jax`` is imported: XLA reads its
thread settings once, when its CPU client starts.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None) -> dict[str, Any]:
    """Give torch, BLAS/OpenMP and XLA the same thread budget; call before importing jax.

    torch: ``torch.set_num_threads``.  XLA has no "use N threads" switch: with one thread
    it gets ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``; with
    fewer threads than cores the whole process is pinned to the first N cores (XLA sizes
    its pool from the affinity mask); with all cores nothing needs limiting.
    """
    cores = available_cores()
    threads = cores if threads is None else threads
    if threads < 1:
        raise ValueError(f"--threads should be >= 1, not {threads}.")
    notes = []
    if threads > cores:
        notes.append(f"asked for {threads} threads but only {cores} cores are available")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    flags = os.environ.get("XLA_FLAGS", "")
    pinned = None
    if threads == 1:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    if 1 < threads < cores:
        pinned = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, pinned)
    os.environ["XLA_FLAGS"] = flags.strip()
    if "jax" in sys.modules:
        notes.append("jax was imported before the thread limits were set: XLA may use more threads")
    torch.set_num_threads(threads)
    return {
        "threads": threads,
        "cores_available": cores,
        "xla_flags": os.environ["XLA_FLAGS"],
        "pinned_cores": pinned,
        "notes": notes,
    }


@dataclass
class Timing:
    """Wall times in seconds of the timed calls (warm-up excluded) and their median."""

    times: list[float] = field(default_factory=list)
    first: float = float("nan")  # the first warm-up call (includes compilation for jit)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_ms": 1e3 * self.median,
            "times_ms": [1e3 * t for t in self.times],
            "first_call_ms": 1e3 * self.first,
        }


def time_call(
    fn: Callable[[Any], Any],
    *,
    repeats: int,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
    block: Callable[[Any], Any] = lambda out: out,
) -> tuple[Timing, Any]:
    """Median wall time of ``block(fn(setup()))``; ``setup`` runs outside the clock.

    ``block`` waits for asynchronous results (``jax.block_until_ready``).  Returns the
    timing and the output of the last call.
    """
    timing, out = Timing(), None
    for i in range(warmup + repeats):
        state = setup() if setup is not None else None
        t0 = time.perf_counter()
        out = block(fn(state))
        dt = time.perf_counter() - t0
        if i == 0:
            timing.first = dt
        if i >= warmup:
            timing.times.append(dt)
    return timing, out


def machine_info(threads: dict[str, Any]) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("jax", "jaxlib", "jaxopt", "torchopt", "numpy"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", None) or _dist_version(mod)
    return {
        "cpu": cpu,
        "platform": platform.platform(),
        "cores_total": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        **threads,
        "versions": versions,
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, numbers right-aligned."""
    cells = [[_cell(c) for c in row] + ["-"] * (len(headers) - len(row)) for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(row: Sequence[str], numeric: bool) -> str:
        out = []
        for i, (c, w) in enumerate(zip(row, widths)):
            right = numeric and i > 0 and _is_number(c)
            out.append(c.rjust(w) if right else c.ljust(w))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers), False), sep] + [line(r, True) for r in cells])


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x"))
        return True
    except ValueError:
        return False


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1e3:
            return f"{value:.0f}"
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.4g}"
    return str(value)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(payload), indent=2, default=_jsonable, allow_nan=False)
    path.write_text(text + "\n")
    return path


def _finite(value: Any) -> Any:
    """NaN/Inf floats to None, so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):  # numpy / jax arrays and scalars
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")

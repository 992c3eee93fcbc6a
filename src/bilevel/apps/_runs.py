"""Run bookkeeping shared by the CLI jobs: options, output folder, atomic checkpoints, JSON, progress.

A job saves its whole state with :func:`save_checkpoint` after every outer step; started
again with ``--resume`` it continues from the last checkpoint, so an interrupted run
loses at most one step.  Results go to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def out_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (tmp file + rename), so an interrupt never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return torch.load(path, weights_only=False)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def progress(iterable: Any, **kwargs: Any) -> Any:
    """tqdm progress bar (to stderr); plain iteration when tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, restored on exit: small problems run fastest so, and
    several threads spin-wait badly on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def job_parser(prog: str, description: str, out: str) -> argparse.ArgumentParser:
    """The options every job has: --out, --seed, --resume, --quick, --no-progress."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--quick", action="store_true", help="tiny settings, for tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_kwargs(args: argparse.Namespace, quick: dict[str, Any], prog: str, counts: dict[str, int]) -> dict[str, Any]:
    """Keyword arguments of a job's Config: the --quick settings, the seed, and every count
    option given on the command line (``counts``: option name -> its least value)."""
    kw: dict[str, Any] = dict(quick) if args.quick else {}
    kw["seed"] = args.seed
    for name, least in counts.items():
        value = getattr(args, name)
        if value is not None:
            if value < least:
                raise SystemExit(f"{prog}: --{name} should be >= {least}, not {value}")
            kw[name] = value
    return kw

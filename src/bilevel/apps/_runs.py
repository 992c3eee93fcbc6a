"""Run bookkeeping shared by the CLI jobs: output folder, atomic checkpoints, JSON, progress.

A job saves its whole state with :func:`save_checkpoint` after every outer step; started
again with ``--resume`` it continues from the last checkpoint, so an interrupted run
loses at most one step.  Results go to ``<out>/results.json``.
"""

from __future__ import annotations

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

"""Run bookkeeping shared by the CLI jobs: options, output folder, atomic checkpoints, JSON, progress.

A job saves its whole state with :func:`save_checkpoint` after every outer step; started
again with ``--resume`` it continues from the last checkpoint, so an interrupted run
loses at most one step.  Results go to ``<out>/results.json``.

Mistakes in how a job is called (an ``--out`` that cannot be written, ``--resume`` with no
or an unreadable checkpoint, a checkpoint of other settings, a bad count) raise
:class:`UserError` before any compute; :func:`run_job` (used by ``bilevel``) prints its
message as one line and exits with status 2, and a Ctrl-C as one line with status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import multiprocessing as mp
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

CHECKPOINT = "checkpoint.pt"  # in the --out folder


class UserError(ValueError):
    """A mistake in how a job was called, with its fix: the CLI prints the message as one
    line on stderr and exits with status 2, without a traceback."""


def run_job(prog: str, main: Callable[[list[str]], int | None], argv: list[str],
            parser: Callable[[], argparse.ArgumentParser] | None = None) -> int:
    """``main(argv)`` with a user's errors as one line on stderr: :class:`UserError` exits
    with status 2, Ctrl-C with 130 (``parser`` finds ``--out`` to say whether a checkpoint
    is there to resume from)."""
    try:
        return int(main(argv) or 0)
    except UserError as e:
        _say(f"{prog}: {e}")
        return 2
    except KeyboardInterrupt:
        ckpt = _checkpoint_of(parser, argv)
        if ckpt is not None and ckpt.is_file():
            _say(f"{prog}: interrupted; {ckpt} keeps the work done so far: "
                 "rerun the same command with --resume to continue")
        else:
            _say(f"{prog}: interrupted before the first checkpoint: rerun the same command to start again")
        return 130


def _say(line: str) -> None:
    print(" ".join(line.split()), file=sys.stderr)  # one line, whatever the message holds


def _checkpoint_of(parser: Callable[[], argparse.ArgumentParser] | None, argv: list[str]) -> Path | None:
    if parser is None:
        return None
    try:
        return Path(parser().parse_known_args(argv)[0].out) / CHECKPOINT
    except (Exception, SystemExit):  # only for the wording of the message
        return None


def _reason(e: BaseException) -> str:
    """``Type: first sentence`` of an exception, short enough for a one-line message."""
    text = " ".join(str(e).split())
    first = text.split(". ")[0].rstrip(".")
    if len(first) > 100:
        first = first[:97] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def prepare_out(path: str | os.PathLike[str], resume: bool) -> Path:
    """The ``--out`` folder, checked before any compute: not a file, creatable, writable
    (a real test write), and with ``resume`` holding a checkpoint.  Raises :class:`UserError`."""
    p = Path(path)
    try:
        if p.exists() and not p.is_dir():
            raise UserError(f"--out {p} is an existing file, not a folder: pass a folder to --out")
        if resume and not (p / CHECKPOINT).is_file():
            raise UserError(f"nothing to resume in {p}: no {CHECKPOINT}; run without --resume to start")
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out {p} is not a writable folder ({_reason(e)}): pass another --out") from None
    return p


def out_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (tmp file + rename), so an interrupt never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, keys: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The state saved at ``path`` (None when there is no file); :class:`UserError` when it
    cannot be read or is not a dict holding ``keys``."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # whatever the bytes are, the file is unusable
        raise _unreadable(path, _reason(e)) from None
    if not isinstance(state, dict):
        raise _unreadable(path, f"it holds a {type(state).__name__}, not a checkpoint")
    missing = [k for k in keys if k not in state]
    if missing:
        raise _unreadable(path, f"no {', '.join(missing)} in it")
    return state


def _unreadable(path: Path, why: str) -> UserError:
    return UserError(f"checkpoint {path} is unreadable ({why}): delete it or run without --resume")


def start_run(out: str | os.PathLike[str], cfg: Any, *, resume: bool, keys: tuple[str, ...] = (),
              grow: dict[str, str] | None = None) -> tuple[Path, dict[str, Any] | None]:
    """Everything a job checks before its compute: the ``--out`` folder (:func:`prepare_out`)
    and, with ``resume``, its checkpoint — readable, a dict with ``"config"`` and ``keys``,
    and saved with the same settings as the dataclass ``cfg``.  ``grow`` maps the settings
    that may grow on resume to the checkpoint's count of them done (``{"steps": "step"}``):
    a checkpoint past them is refused.  Returns the folder and the saved state (None when
    not resuming); raises :class:`UserError`."""
    folder = prepare_out(out, resume)
    if not resume:
        return folder, None
    ckpt, grow = folder / CHECKPOINT, grow or {}
    saved = load_checkpoint(ckpt, tuple(dict.fromkeys(("config", *keys, *grow.values()))))
    assert saved is not None  # prepare_out saw the file
    if not isinstance(saved["config"], dict):
        raise _unreadable(ckpt, "its config is not a dict")
    was, now = _comparable(saved["config"]), _comparable(dataclasses.asdict(cfg))
    differ = sorted(k for k in was.keys() | now.keys() if k not in grow and was.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k} {was.get(k)!r} there, {now.get(k)!r} here" for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        only = f" (only {', '.join('--' + k for k in grow)} may change)" if grow else ""
        raise UserError(f"checkpoint {ckpt} belongs to a run with other settings ({shown}{more}): "
                        f"resume with the same options{only}, or run without --resume to start over")
    for name, done_key in grow.items():
        done = saved[done_key]
        if not isinstance(done, int):
            raise _unreadable(ckpt, f"its {done_key} is not a count")
        if done > now[name]:
            raise UserError(f"checkpoint {ckpt} is at {done_key} {done}, past --{name} {now[name]}: "
                            f"resume with --{name} {done} or more")
    return folder, saved


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


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


def run_small(run: Callable[..., dict[str, Any]], cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``run(cfg, out, ...)`` with the options every job has (--out, --device, --resume,
    --no-progress, --checkpoint-every); on the CPU with one thread (:func:`one_thread`): the
    jobs' small networks run fastest so."""
    device = resolve_device(args.device)
    with one_thread() if device.type == "cpu" else contextlib.nullcontext():
        return run(cfg, Path(args.out), resume=args.resume, show=not args.no_progress, every=args.checkpoint_every,
                   device=device)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are :class:`UserError` (one line, status 2 from
    :func:`run_job`) instead of a usage block and ``SystemExit``."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UserError(f"{message}; see `{self.prog} --help`")


def job_parser(prog: str, description: str, out: str, *, device: bool = False,
               checkpoint_every: bool = False) -> argparse.ArgumentParser:
    """The options every job has: --out, --seed, --resume, --quick, --no-progress; with
    ``device`` also --device (see :func:`resolve_device`), with ``checkpoint_every`` also
    --checkpoint-every N (outer steps between checkpoints, see :func:`steps`)."""
    p = _Parser(prog=prog, description=description)
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--quick", action="store_true", help="tiny settings, for tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if device:
        p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    if checkpoint_every:
        p.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                       help="save a checkpoint every N outer steps (default 1)")
    return p


def resolve_device(name: str) -> torch.device:
    """``--device`` as a :class:`torch.device`, checked before any compute: an unknown name
    or a CUDA device this machine does not have is a :class:`UserError`."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device: pass cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}); "
                            "run with --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                            "pass cuda:0 or another index below that")
    elif dev.type != "cpu":
        raise UserError(f"--device {name}: the jobs run on cpu or cuda; pass one of them")
    return dev


def steps(total: int, state: dict[str, Any], save: Callable[[dict[str, Any]], None], *, every: int = 1,
          desc: str = "outer steps", show: bool = True) -> Iterator[int]:
    """The outer-step loop of a resumable job: yields ``state["step"], …, total - 1`` (so a
    resumed run starts where its checkpoint stopped) under a progress bar; after the body of
    step ``i`` ran, sets ``state["step"] = i + 1`` and calls ``save(state)`` every ``every``
    steps and after the last one.  A job whose steps draw random numbers should draw them from
    a generator seeded by ``(seed, step)``, or keep its generator's state in ``state``, so that
    a resumed run gives the numbers of an uninterrupted one."""
    if every < 1:
        raise UserError(f"--checkpoint-every should be >= 1, not {every}")
    start = int(state.get("step", 0))
    bar = progress(range(start, total), desc=desc, unit="step", initial=start, total=total) if show \
        else range(start, total)
    for i in bar:
        yield i
        state["step"] = i + 1
        if (i + 1) % every == 0 or i + 1 == total:
            save(state)


# Okabe–Ito: told apart with every common colour-vision deficiency; the jobs' plots use it in order
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def figure(*, ncols: int = 1, nrows: int = 1, size: tuple[float, float] | None = None) -> tuple[Any, Any]:
    """A matplotlib ``(fig, axes)`` that draws without a display (Agg) and cycles through
    :data:`PALETTE`; save it with ``fig.savefig(path, dpi=110)``."""
    from cycler import cycler
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size or (5.0 * ncols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_prop_cycle(cycler(color=PALETTE))
    return fig, (axes[0, 0] if nrows == ncols == 1 else axes.flat[:] if nrows == 1 or ncols == 1 else axes)


def accuracy_bars(ax: Any, test: dict[str, Any], shots: list[Any], ways: int, title: str) -> None:
    """Few-shot test accuracy (%) as grouped bars with 95% intervals: one group per shot count,
    one bar per method; ``test[method][str(shots)]`` holds ``accuracy`` and ``ci95`` (fractions)."""
    names, keys = list(test), [str(k) for k in shots]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        acc = [100 * test[name][k]["accuracy"] for k in keys]
        ci = [100 * test[name][k]["ci95"] for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], acc, width, yerr=ci, label=name,
               color=PALETTE[i % len(PALETTE)])
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))], [f"{ways}-way {k}-shot" for k in keys])
    ax.set(ylabel="test accuracy (%)", title=title)
    ax.legend(fontsize=8)


def config_kwargs(args: argparse.Namespace, quick: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """Keyword arguments of a job's Config: the --quick settings, the seed, and every count
    option given on the command line (``counts``: option name -> its least value)."""
    kw: dict[str, Any] = dict(quick) if args.quick else {}
    kw["seed"] = args.seed
    for name, least in counts.items():
        value = getattr(args, name)
        if value is not None:
            if value < least:
                raise UserError(f"--{name} should be >= {least}, not {value}: pass --{name} {least} or more")
            kw[name] = value
    return kw


# ----------------------------------------------------------------------------- peak memory


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _measure_in_child(fn: Callable[[], Any], conn: Any) -> None:
    """In a forked process: warm up, then the peak RSS of one more ``fn()`` above the baseline.

    glibc's mmap threshold is fixed at 64 KiB so that every tensor of that size or more is a
    mapping of its own, returned to the kernel when freed (RSS follows the live tensors);
    ``malloc_trim`` returns the heap's free pages; writing 5 to /proc/self/clear_refs resets
    the kernel's high-water mark VmHWM to the current RSS."""
    try:
        libc = _libc()
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        fn()  # one-time costs (lazy initialisation) are not part of the step
        gc.collect()
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
        fn()
        conn.send({"peak_bytes": (_status_kib("VmHWM") - base) * 1024, "how": "VmHWM - VmRSS (clear_refs)"})
    except Exception as err:  # reported in the table, the other measurements go on
        conn.send({"peak_bytes": None, "how": f"unavailable ({type(err).__name__}: {err})"})
    finally:
        conn.close()


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of one call of ``fn`` (after a warm-up call), in bytes: CUDA's allocator
    peak on a GPU, else the peak RSS of a forked process (Linux; None elsewhere)."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "how": "cuda max_memory_allocated"}
    if not Path("/proc/self/clear_refs").exists() or "fork" not in mp.get_all_start_methods():
        return {"peak_bytes": None, "how": "unavailable (needs Linux /proc and fork)"}
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure_in_child, args=(fn, send))
    proc.start()
    send.close()
    try:
        out = recv.recv()
    except EOFError:
        out = {"peak_bytes": None, "how": "unavailable (the measuring process died)"}
    proc.join()
    return out

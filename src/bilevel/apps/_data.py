"""Image datasets the jobs use, all local: scikit-learn's bundled digits, and MNIST /
Fashion-MNIST in the IDX format (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-…``) that the original sites and torchvision use.  Nothing is downloaded.

Where the IDX files are looked for, in order (the first folder holding all four files wins):
``--data-dir`` itself; ``$BILEVEL_DATA/<name>``; ``~/.cache/bilevel/<name>``; torchvision's
layout ``<root>/<Name>/raw`` under ``$TORCHVISION_ROOT``, ``~/.torch/datasets``, ``./data``;
and for Fashion-MNIST ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).

Few-shot episodes (the ``hyperrep`` and ``imaml`` jobs): :func:`load_pools` splits a dataset's
classes into a meta-train and a meta-test half (digits, Fashion-MNIST, or Omniglot from a
local copy in torchvision's layout), :func:`sample_episodes` draws N-way K-shot episodes.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from bilevel.apps._runs import UserError

DATASETS = ("digits", "mnist", "fashion-mnist")
_TORCHVISION_NAME = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_HOW_TO_GET = {
    "mnist": "put the four MNIST IDX files there (torchvision.datasets.MNIST(root, download=True) writes them)",
    "fashion-mnist": "`apt-get install dataset-fashion-mnist` installs them, or put the four IDX files there",
}
# IDX element types (the third byte of the magic number)
_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32,
               0x0D: torch.float32, 0x0E: torch.float64}


@dataclass(frozen=True)
class Split:
    """A train / validation / test split of one dataset; a job's ``Data`` adds its own fields."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class Images:
    """``X``: float32 in [0, 1], one flattened image per row; ``y``: int64 labels; ``shape``:
    the image shape (``(8, 8)`` for digits, ``(28, 28)`` for MNIST)."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    shape: tuple[int, int]
    name: str
    source: str  # where it was read from


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """The array in an IDX file (gzipped or not): magic ``0x0000TTNN`` (type ``TT``, ``NN``
    dimensions), ``NN`` big-endian int32 sizes, then the data, big-endian."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a cut or corrupt .gz, an unreadable file
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())}): "
                        "download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number): check the file or --data-dir")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path} is truncated: its header is cut short; download it again")
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    count = 1
    for n in dims:
        count *= n
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(body) != count * itemsize:
        raise UserError(f"{path} is truncated or padded: {len(body)} data bytes for shape {dims}; "
                        "download it again")
    t = torch.frombuffer(bytearray(body), dtype=dtype)
    if itemsize > 1:  # IDX is big-endian; torch reads native (little-endian) order
        t = t.view(torch.uint8).view(-1, itemsize).flip(1).reshape(-1).view(dtype)
    return t.reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def candidate_dirs(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders searched for ``name``'s IDX files, in order."""
    if data_dir is not None:
        return [Path(data_dir), Path(data_dir) / name, Path(data_dir) / _TORCHVISION_NAME[name] / "raw"]
    dirs = []
    if os.environ.get("BILEVEL_DATA"):
        dirs.append(Path(os.environ["BILEVEL_DATA"]) / name)
    dirs.append(Path.home() / ".cache" / "bilevel" / name)
    roots = [os.environ.get("TORCHVISION_ROOT"), Path.home() / ".torch" / "datasets", Path("data")]
    dirs += [Path(r) / _TORCHVISION_NAME[name] / "raw" for r in roots if r]
    if name == "fashion-mnist":
        dirs.append(Path("/usr/share/datasets/fashion-mnist"))
    return dirs


def find_idx(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The four IDX files of ``name`` (train images, train labels, test images, test labels);
    a one-line :class:`UserError` saying where it looked and how to get them when absent."""
    looked = candidate_dirs(name, data_dir)
    for folder in looked:
        files = [_idx_file(folder, s) for s in _STEMS]
        if all(files):
            return files  # type: ignore[return-value]
    where = ", ".join(str(d) for d in looked)
    raise UserError(f"no {name} IDX files found (looked in {where}): {_HOW_TO_GET[name]}, "
                    "or pass --data-dir DIR, or use --dataset digits")


def load_images(name: str, data_dir: str | os.PathLike[str] | None = None) -> Images:
    """``digits`` (scikit-learn's, 1797 8×8 images, split 1000 / 797 here in file order) or
    ``mnist`` / ``fashion-mnist`` (60000 / 10000 28×28) from local IDX files."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X = torch.as_tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.as_tensor(d.target, dtype=torch.long)
        return Images(X[:1000], y[:1000], X[1000:], y[1000:], (8, 8), name, "sklearn.datasets.load_digits")
    if name not in _TORCHVISION_NAME:
        raise UserError(f"--dataset {name!r} is not known: pass one of {', '.join(DATASETS)}")
    files = find_idx(name, data_dir)
    Xtr, ytr, Xte, yte = (read_idx(f) for f in files)
    if Xtr.ndim != 3 or Xte.ndim != 3 or len(Xtr) != len(ytr) or len(Xte) != len(yte):
        raise UserError(f"{files[0].parent} holds IDX files of the wrong shapes ({tuple(Xtr.shape)}, "
                        f"{tuple(ytr.shape)}): check --data-dir")
    shape = (int(Xtr.shape[1]), int(Xtr.shape[2]))
    to_float = lambda X: X.reshape(len(X), -1).to(torch.float32) / 255.0
    return Images(to_float(Xtr), ytr.long(), to_float(Xte), yte.long(), shape, name, str(files[0].parent))


def write_idx(path: str | os.PathLike[str], array: torch.Tensor) -> None:
    """Write ``array`` (uint8, int32 or float32) as an IDX file, gzipped when ``path`` ends in
    ``.gz``: used by the tests to make small IDX files, and by anyone caching a subset."""
    codes = {v: k for k, v in _IDX_DTYPES.items()}
    if array.dtype not in codes:
        raise ValueError(f"IDX cannot hold {array.dtype}")
    a = array.contiguous()
    head = bytes([0, 0, codes[a.dtype], a.ndim]) + struct.pack(f">{a.ndim}i", *a.shape)
    itemsize = a.element_size()
    data = a.reshape(-1).view(torch.uint8)
    if itemsize > 1:
        data = data.view(-1, itemsize).flip(1).reshape(-1)
    body = head + bytes(data.numpy().tobytes())
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(body)


# ----------------------------------------------------------------------------- few-shot episodes

EPISODE_DATASETS = ("digits", "fashion-mnist", "omniglot")


class Pools(NamedTuple):
    """Images (n, c, h, w) float32 and labels, split by class into meta-train and meta-test."""

    X_train: torch.Tensor
    y_train: torch.Tensor  # labels 0..C_train−1
    X_test: torch.Tensor
    y_test: torch.Tensor  # labels 0..C_test−1
    shape: tuple[int, int]
    source: str


def _by_class(X: torch.Tensor, y: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.isin(y, torch.tensor(classes))
    relabel = {c: i for i, c in enumerate(classes)}
    return X[keep], torch.tensor([relabel[int(c)] for c in y[keep]], dtype=torch.long)


def load_omniglot(data_dir: str | os.PathLike[str] | None, side: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``<data_dir>/images_background/<alphabet>/<character>/*.png`` (torchvision's
    Omniglot layout), grey, resized to ``side``×``side``, strokes = 1; one label per character."""
    if data_dir is None:
        raise UserError("--dataset omniglot needs --data-dir DIR holding images_background/<alphabet>/"
                        "<character>/*.png (torchvision's Omniglot layout); none ships with bilevel")
    root = Path(data_dir) / "images_background"
    if not root.is_dir():
        root = Path(data_dir) / "omniglot-py" / "images_background"  # torchvision's download folder
    chars = sorted(p for p in root.glob("*/*") if p.is_dir()) if root.is_dir() else []
    if not chars:
        raise UserError(f"no Omniglot characters in {Path(data_dir) / 'images_background'} "
                        "(expected <alphabet>/<character>/*.png): check --data-dir")
    from PIL import Image

    images, labels = [], []
    for label, folder in enumerate(chars):
        for png in sorted(folder.glob("*.png")):
            with Image.open(png) as im:
                a = torch.tensor(list(im.convert("L").resize((side, side), Image.BILINEAR).getdata()),
                                 dtype=torch.float32)
            images.append(1.0 - a.reshape(side, side) / 255.0)
            labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def load_pools(dataset: str, data_dir: str | os.PathLike[str] | None, ways: int, need: int) -> Pools:
    """Meta-train / meta-test pools of ``dataset`` (one of :data:`EPISODE_DATASETS`): the first
    half of the classes (in sorted order), and the rest.  ``need``: the images an episode
    takes from one class (shots + queries); a half with fewer than ``ways`` classes, or a
    class with fewer than ``need`` images, is a one-line :class:`UserError`."""
    if dataset == "omniglot":
        X, y = load_omniglot(data_dir)
        shape, source = (X.shape[1], X.shape[2]), str(data_dir)
        X = X[:, None]
    else:
        imgs = load_images(dataset, data_dir)
        X = torch.cat([imgs.X_train, imgs.X_test]).reshape(-1, 1, *imgs.shape)
        y = torch.cat([imgs.y_train, imgs.y_test])
        shape, source = imgs.shape, imgs.source
    classes = sorted(int(c) for c in torch.unique(y))
    half = len(classes) // 2
    Xtr, ytr = _by_class(X, y, classes[:half])
    Xte, yte = _by_class(X, y, classes[half:])
    for name, labels in (("meta-train", ytr), ("meta-test", yte)):
        counts = torch.bincount(labels)
        if len(counts) < ways:
            raise UserError(f"{dataset}: the {name} half has {len(counts)} classes, fewer than --ways {ways}")
        if int(counts.min()) < need:
            raise UserError(f"{dataset}: a {name} class has {int(counts.min())} images, fewer than "
                            f"shots + queries = {need}; lower --queries")
    return Pools(Xtr, ytr, Xte, yte, shape, source)


class Episodes(NamedTuple):
    """B episodes stacked on dim 0: support (B, N·K, ...) with labels, query (B, N·Q, ...)."""

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor


def sample_episodes(gen: torch.Generator, X: torch.Tensor, y: torch.Tensor, n: int, ways: int, shots: int,
                    queries: int) -> Episodes:
    """``n`` episodes: ``ways`` classes drawn without replacement, relabelled 0..ways−1;
    ``shots`` support and ``queries`` query images per class, disjoint."""
    n_classes = int(y.max()) + 1
    members = [torch.nonzero(y == c).flatten() for c in range(n_classes)]
    xs, ys, xq, yq = [], [], [], []
    for _ in range(n):
        classes = torch.randperm(n_classes, generator=gen)[:ways]
        s_idx, q_idx = [], []
        for c in classes.tolist():
            pick = members[c][torch.randperm(len(members[c]), generator=gen)[: shots + queries]]
            s_idx.append(pick[:shots])
            q_idx.append(pick[shots:])
        lab = torch.arange(ways)
        xs.append(X[torch.cat(s_idx)])
        ys.append(lab.repeat_interleave(shots))
        xq.append(X[torch.cat(q_idx)])
        yq.append(lab.repeat_interleave(queries))
    return Episodes(torch.stack(xs), torch.stack(ys), torch.stack(xq), torch.stack(yq))

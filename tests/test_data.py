"""The local image data of the jobs: the IDX reader on small files written here (gzipped and
plain, several element types, big-endian on disk), one-line errors for a cut file, a bad
magic number and an absent dataset, and real Fashion-MNIST where it is installed."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from bilevel.apps import _data
from bilevel.apps._runs import UserError

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(("dtype", "values"), [
    (torch.uint8, [[0, 1, 255], [7, 128, 3]]),
    (torch.int32, [[-2, 1, 2**31 - 1], [256, -(2**31), 65536]]),
    (torch.float32, [[0.5, -1.25, 3e38], [1e-30, 0.0, -7.0]]),
])
def test_write_then_read_gives_the_array_back(tmp_path, suffix, dtype, values):
    a = torch.tensor(values, dtype=dtype)
    path = tmp_path / f"a-idx2{suffix}"
    _data.write_idx(path, a)
    back = _data.read_idx(path)
    assert back.dtype == dtype and back.shape == a.shape
    assert torch.equal(back, a)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzipped


def test_idx_is_big_endian_on_disk(tmp_path):
    """The bytes follow the format, not this machine's order: a file built by hand reads right,
    and write_idx writes those same bytes."""
    values = [1, 256, -2, 70000]
    raw = bytes([0, 0, 0x0C, 1]) + struct.pack(">i", 4) + struct.pack(">4i", *values)
    (tmp_path / "hand").write_bytes(raw)
    assert _data.read_idx(tmp_path / "hand").tolist() == values
    _data.write_idx(tmp_path / "ours", torch.tensor(values, dtype=torch.int32))
    assert (tmp_path / "ours").read_bytes() == raw
    floats = bytes([0, 0, 0x0D, 1]) + struct.pack(">i", 2) + struct.pack(">2f", 1.5, -0.25)
    (tmp_path / "f").write_bytes(floats)
    assert _data.read_idx(tmp_path / "f").tolist() == [1.5, -0.25]


def test_three_dimensional_images(tmp_path):
    a = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    _data.write_idx(tmp_path / "x.gz", a)
    assert torch.equal(_data.read_idx(tmp_path / "x.gz"), a)


def _one_line_error(path, *words):
    with pytest.raises(UserError) as e:
        _data.read_idx(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_file_is_a_one_line_error(tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    _data.write_idx(full, torch.zeros(10, 5, dtype=torch.int32))
    body = gzip.decompress(full.read_bytes()) if suffix else full.read_bytes()
    for cut in (len(body) - 3, 7):  # in the data; in the header's sizes
        short = tmp_path / f"short{cut}{suffix}"
        short.write_bytes(gzip.compress(body[:cut]) if suffix else body[:cut])
        _one_line_error(short, "truncated", "download it again")


def test_cut_gzip_stream_is_a_one_line_error(tmp_path):
    path = tmp_path / "x.gz"
    _data.write_idx(path, torch.zeros(100, dtype=torch.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(path, "cannot be read", "download it again")


@pytest.mark.parametrize("head", [b"\x08\x03\x00\x00", b"\x00\x00\x42\x01", b"\x00\x00", b"PK\x03\x04"])
def test_bad_magic_is_a_one_line_error(tmp_path, head):
    path = tmp_path / "bad"
    path.write_bytes(head + b"\x00" * 16)
    _one_line_error(path, "not an IDX file", "bad magic")


def test_write_refuses_a_type_idx_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="IDX cannot hold"):
        _data.write_idx(tmp_path / "x", torch.zeros(3, dtype=torch.int64))


def _fake_set(folder: Path, n_train=6, n_test=4, shape=(5, 3), gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    ext = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (n_train, *shape), generator=gen, dtype=torch.uint8),
        "train-labels-idx1-ubyte": torch.arange(n_train, dtype=torch.uint8) % 10,
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, *shape), generator=gen, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte": torch.arange(n_test, dtype=torch.uint8) % 10,
    }
    for stem, a in arrays.items():
        _data.write_idx(folder / (stem + ext), a)
    return arrays


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_load_images_from_a_data_dir(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    arrays = _fake_set(folder, gz=layout == "flat")
    images = _data.load_images("mnist", tmp_path)
    assert images.shape == (5, 3) and images.source == str(folder)
    assert images.X_train.shape == (6, 15) and images.X_test.shape == (4, 15)
    assert images.X_train.dtype == torch.float32 and images.y_train.dtype == torch.int64
    assert torch.equal(images.X_train, arrays["train-images-idx3-ubyte"].reshape(6, -1).float() / 255)
    assert images.y_test.tolist() == [0, 1, 2, 3]


def test_absent_dataset_is_one_line_naming_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BILEVEL_DATA", raising=False)
    monkeypatch.delenv("TORCHVISION_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    for data_dir in (None, tmp_path / "nowhere"):
        with pytest.raises(UserError) as e:
            _data.load_images("mnist", data_dir)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("no mnist IDX files found (looked in ")
        assert "--data-dir" in msg and "torchvision.datasets.MNIST" in msg
        for folder in _data.candidate_dirs("mnist", data_dir):
            assert str(folder) in msg


def test_half_a_dataset_is_not_found(tmp_path):
    _fake_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="no fashion-mnist IDX files found"):
        _data.find_idx("fashion-mnist", tmp_path)


def test_unknown_dataset_is_refused():
    with pytest.raises(UserError, match="not known"):
        _data.load_images("cifar")


def test_digits():
    images = _data.load_images("digits")
    assert images.shape == (8, 8) and images.X_train.shape == (1000, 64) and len(images.y_test) == 797
    assert images.X_train.min() == 0 and images.X_train.max() == 1


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"Fashion-MNIST is not installed at {FASHION}")
def test_real_fashion_mnist():
    """The Debian package's files, found without --data-dir: 60000 + 10000 images of 28×28, ten
    balanced classes, pixels in [0, 1] (the IDX bytes 0 and 255 both occur)."""
    images = _data.load_images("fashion-mnist")
    assert images.shape == (28, 28)
    assert images.X_train.shape == (60000, 784) and images.X_test.shape == (10000, 784)
    assert torch.bincount(images.y_train).tolist() == [6000] * 10
    assert torch.bincount(images.y_test).tolist() == [1000] * 10
    assert images.X_train.min() == 0 and images.X_train.max() == 1
    # the first training image of Fashion-MNIST is an ankle boot (class 9), the first test image too
    assert int(images.y_train[0]) == 9 and int(images.y_test[0]) == 9

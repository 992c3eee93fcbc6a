"""Smoke test of benchmarks/logreg.py: it runs, prints its table, writes its JSON, and its
numbers are right where they can be checked (an inner problem solved to convergence)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import logreg  # noqa: E402

OURS = ("AID-FP", "AID-CG", "Neumann", "ITD")


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_exact_reference_matches_finite_differences():
    """The reference every error is measured against: Newton + dense solve vs central FD."""
    data = logreg.make_data(40, 4, seed=3)
    exact = logreg.exact_hypergrad(data)
    assert exact.grad_norm < 1e-12
    Xv = torch.as_tensor(data.Xv)
    yv = torch.as_tensor(data.yv)

    def F(lam):
        w = logreg.exact_hypergrad(logreg.Data(data.X, data.y, data.Xv, data.yv, lam)).params
        return torch.nn.functional.softplus(-yv * (Xv @ w)).mean().item()

    h = 1e-5
    fd = []
    for j in range(4):
        e = h * (torch.arange(4) == j).numpy()
        fd.append((F(data.lam + e) - F(data.lam - e)) / (2 * h))
    assert logreg.rel_err(torch.tensor(fd, dtype=torch.float64), exact.hypergrad) < 1e-7


def test_parse_sizes():
    assert logreg.parse_sizes("2000x200,10000X1000") == [(2000, 200), (10000, 1000)]
    with pytest.raises(argparse.ArgumentTypeError, match="2000x200"):
        logreg.parse_sizes("2000-200")


def test_logreg_smoke(tmp_path):
    """Tiny size, converged inner problem (T=300, step 2): every method close to exact."""
    out = tmp_path / "logreg.json"
    cmd = [
        sys.executable, str(BENCH / "logreg.py"), "--sizes", "150x10", "--repeats", "1",
        "--T", "300", "--K", "20", "--step", "2", "--warmup", "0", "--threads", "1", "--out", str(out),
    ]
    peers = _importable("torchopt") or _importable("jaxopt")
    if not peers:
        cmd.append("--skip-peers")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists()
    result = json.loads(out.read_text())["results"][0]
    assert (result["n"], result["d"]) == (150, 10)
    assert result["inner_rel_err"] < 1e-12
    rows = {m["method"]: m for m in result["methods"]}
    for name in OURS + ("analytic CG",):
        row = rows[name]
        assert row["error"] is None, row["error"]
        assert row["pipeline"]["median_ms"] > 0 and row["hypergrad_only"]["median_ms"] > 0
        # Richardson/Neumann converge linearly (rate 1 − η·μ): K=20 gets ~1e-4 here.
        tol = 1e-3 if name in ("AID-FP", "Neumann") else 1e-10
        assert row["rel_err"] < tol, (name, row["rel_err"])
        assert row["rel_err_hypergrad_only"] < tol, (name, row["rel_err_hypergrad_only"])
    expected_peers = {"TorchOpt CG": "torchopt", "JAXopt CG (jit)": "jaxopt"}
    for name, module in expected_peers.items():
        if _importable(module):
            assert rows[name]["error"] is None, rows[name]["error"]
            assert rows[name]["rel_err"] < 1e-10, (name, rows[name]["rel_err"])
            peer = name.split()[0]
            assert result["ratios"][f"AID-CG / {peer}"]["pipeline"] > 0
            assert f"pipe÷{peer}" in proc.stdout
        else:
            assert name not in rows
    # the table: a header, one line per method, the machine-readable file named
    assert "pipeline ms" in proc.stdout and "hypergrad ms" in proc.stdout
    for name in OURS:
        assert f"\n{name} " in proc.stdout
    assert f"wrote {out}" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only skip")
def test_cuda_request_without_a_gpu_is_skipped_cleanly(tmp_path):
    out = tmp_path / "cuda.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "logreg.py"), "--device", "cuda", "--out", str(out)],
        capture_output=True, text=True, timeout=60, cwd=BENCH.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA GPU" in proc.stdout and "skipped" in proc.stdout
    assert not out.exists()


def test_overhead_ratio_and_inner_solver_rows(tmp_path):
    """The overhead line is printed and in the JSON; the L-BFGS/Newton pipelines reach the
    exact hypergradient (a converged inner solve) in the time-to-accuracy table."""
    out = tmp_path / "tta.json"
    cmd = [
        sys.executable, str(BENCH / "logreg.py"), "--sizes", "120x8", "--repeats", "1", "--warmup", "0",
        "--threads", "1", "--skip-peers", "--tta", "1e-8", "--tta-doublings", "1",
        "--tta-methods", "Newton,LBFGS", "--out", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overhead ratio" in proc.stdout
    result = json.loads(out.read_text())["results"][0]
    assert result["overhead_ratio"] > 0 and result["hypergrad_work"]["median_ms"] > 0
    rows = {r["method"]: r for r in result["time_to_accuracy"]}
    assert set(rows) == {"Newton-CG + AID-CG", "LBFGS + AID-CG", "LBFGS + AID-PCG"}
    for name, row in rows.items():
        assert row["reached"] and row["rel_err"] <= 1e-8, (name, row)

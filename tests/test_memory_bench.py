"""benchmarks/memory.py: its --quick run writes the JSON it promises, AID's peak memory is
flat in T, and the helpers it reports with are right."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import memory  # noqa: E402


def test_fitted_exponent_recovers_powers():
    Ts = [25, 100, 400, 1600]
    assert memory.fitted_exponent(Ts, [3.0 * t**0.5 for t in Ts]) == pytest.approx(0.5, abs=1e-12)
    assert memory.fitted_exponent(Ts, [7.0 * t for t in Ts]) == pytest.approx(1.0, abs=1e-12)
    assert memory.fitted_exponent(Ts, [5.0] * 4) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(memory.fitted_exponent([10], [1.0]))


def test_claims_pass_and_miss():
    summary = {
        "AID-CG": {"ratio": 1.04, "exponent": 0.0},
        "ITD truncated": {"ratio": 1.06, "exponent": 0.0},
        "ITD checkpoint": {"ratio": 4.0, "exponent": 0.61},
        "ITD full": {"ratio": 16.0, "exponent": 1.0},
    }
    verdicts = [c["pass"] for c in memory.claims(summary, 1e-15)]
    assert verdicts == [True, False, False, True, True]
    assert [c["pass"] for c in memory.claims({}, math.nan)] == [None] * 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc (Linux)")
def test_quick_run_writes_json_and_aid_is_flat(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "memory.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS  AID-CG peak flat in T" in proc.stdout, proc.stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "memory"
    assert {"config", "machine", "notes", "results", "summary", "claims", "measure"} <= data.keys()
    cfg = data["config"]
    assert cfg["quick"] and cfg["vector_bytes"] == 8 * cfg["d"]
    rows = data["results"]
    expected = {(c.method, c.T) for c in memory.configs(memory.parse_args(["--quick"]))}
    assert {(r["method"], r["T"]) for r in rows} == expected
    for r in rows:
        assert "error" not in r, r
        assert {"peak_bytes", "peak_mib", "seconds", "how"} <= r.keys()
        assert r["peak_bytes"] > 0 and r["peak_mib"] == pytest.approx(r["peak_bytes"] / 2**20)

    aid = sorted((r for r in rows if r["method"] == "AID-CG"), key=lambda r: r["T"])
    ratio = aid[-1]["peak_bytes"] / aid[0]["peak_bytes"]
    assert abs(ratio - 1) <= 0.05, aid
    assert data["summary"]["AID-CG"]["ratio"] == pytest.approx(ratio)
    # AID holds a few vectors (CG's and the Hessian-vector products'), not T of them
    assert aid[-1]["peak_bytes"] < 40 * cfg["vector_bytes"], aid
    # full ITD keeps every step: 4x the steps is well over 2x the memory
    full = sorted((r for r in rows if r["method"] == "ITD full"), key=lambda r: r["T"])
    assert full[-1]["peak_bytes"] > 2 * full[0]["peak_bytes"], full
    claims = {c["claim"].split(" (")[0]: c for c in data["claims"]}
    assert claims["AID-CG peak flat in T"]["pass"] is True
    assert claims["checkpointed ITD hypergradient = full ITD's"]["value"] <= 1e-12


def test_cuda_request_without_cuda_is_skipped_with_a_note(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the skip path does not run here")
    out = tmp_path / "memory_cuda.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "memory.py"), "--device", "cuda", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["results"] == [] and any("CUDA is not available" in n for n in data["notes"])
    assert all(c["pass"] is None for c in data["claims"])

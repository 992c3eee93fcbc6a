"""The iteration-complexity job: a --quick run end to end, the science on a tiny instance,
and kill-and-resume giving the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bilevel.apps import iteration_complexity as ic

pytestmark = pytest.mark.usefixtures("one_thread")


def _numbers(res):
    return json.dumps({k: v for k, v in res.items() if k != "seconds"}, sort_keys=True)


def test_quick_run_writes_results_and_plot(tmp_path, capsys):
    assert ic.main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res) >= {"config", "problems", "scales", "seconds"}
    assert set(res["problems"]) == set(ic.PROBLEMS)
    for pr in res["problems"].values():
        for m in ic.METHODS:
            c = pr["curves"][m]
            assert all(math.isfinite(e) for e in c["error"]) and math.isfinite(c["rate"])
            assert len(c["estimate"]) == len(c["t"])
        itd = pr["curves"]["ITD"]  # ITD's estimate (hypergrad_error) bounds its error above rounding
        assert all(est >= err for err, est in zip(itd["error"], itd["estimate"]) if err > 1e-12)
        assert set(pr["budgets"]) == {"0.001", "1e-06"}
    assert (tmp_path / "iteration_complexity.png").stat().st_size > 10_000
    assert "AID-CG" in capsys.readouterr().out


def test_exact_hypergradient_matches_finite_differences():
    cfg = ic.Config(**ic.QUICK)
    for name in ic.PROBLEMS:
        p = ic.make_problem(name, cfg)

        def F(lam, p=p):
            return p.outer_loss(ic._newton(p.inner_loss, p.w_star.clone(), lam), lam)

        u = torch.randn(p.hparams.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        h = 1e-5
        fd = (F(p.hparams + h * u) - F(p.hparams - h * u)) / (2 * h)
        assert float(p.exact @ u) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def test_errors_decrease_and_estimates_bound_them_at_the_end():
    cfg = ic.Config(**{**ic.QUICK, "max_log2_t": 6})
    p = ic.make_problem("logreg", cfg)
    c = ic.curves(p, cfg)
    for m in ic.METHODS:
        assert c[m]["error"][-1] < 0.1 * c[m]["error"][0]
        assert 0 < c[m]["rate"] < 1
    for m in ic.METHODS[1:]:
        assert c[m]["estimate"][-1] >= c[m]["error"][-1]
    assert c["AID-CG"]["error"][-1] < c["AID-FP"]["error"][-1]  # CG beats fixed-point iterations


def test_kill_and_resume_gives_the_uninterrupted_numbers(tmp_path, killed_at):
    full = ic.run(ic.Config(**ic.QUICK), tmp_path / "full", show=False)

    revive = killed_at(ic, "curves", 2)
    with pytest.raises(KeyboardInterrupt):
        ic.run(ic.Config(**ic.QUICK), tmp_path / "cut", show=False)
    revive()
    resumed = ic.run(ic.Config(**ic.QUICK), tmp_path / "cut", resume=True, show=False)
    assert _numbers(resumed) == _numbers(full)

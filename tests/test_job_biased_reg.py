"""bilevel run biased-reg: the meta-gradient against its closed form and finite differences,
the batched within-task SGD against a plain loop, a --quick run end to end, kill-and-resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

import bilevel
from bilevel.apps import biased_reg as job

DT = torch.float64


def _task(n=6, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DT)
    y = torch.randn(n, generator=gen, dtype=DT)
    h = torch.randn(d, generator=gen, dtype=DT)
    return X, y, h


def _surrogate(h, X, y, lam):
    """L_Z(h) = min_w g_Z(w, h), the minimum taken exactly."""
    return job.regularised_risk(job.inner_solution(h, X, y, lam), h, X, y, lam)


@pytest.mark.parametrize("lam", [0.05, 1.0, 7.0])
def test_meta_gradient_is_closed_form_and_finite_differences(one_thread, lam):
    X, y, h = _task()
    hg = job.exact_meta_gradient(h, X, y, lam)
    closed = lam * (h - job.inner_solution(h, X, y, lam))  # the paper's ∇L_Z(h) = λ(h − w_h)
    torch.testing.assert_close(hg, closed, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    fd = torch.stack([(_surrogate(h + eps * e, X, y, lam) - _surrogate(h - eps * e, X, y, lam)) / (2 * eps)
                      for e in torch.eye(len(h), dtype=DT)])
    torch.testing.assert_close(hg, fd, rtol=1e-6, atol=1e-8)


def test_meta_gradient_is_not_the_gradient_at_a_wrong_point(one_thread):
    """The check above can fail: λ(h − w) at a w that is not the minimiser is far from it."""
    X, y, h = _task(seed=1)
    lam = 0.5
    hg = job.exact_meta_gradient(h, X, y, lam)
    wrong = lam * (h - job.inner_solution(h, X, y, 2 * lam))
    assert (wrong - hg).norm() > 1e-3 * hg.norm()


def test_aid_at_the_sgd_output_corrects_it_on_the_square_loss(one_thread):
    """At an inexact w (the SGD output), AID adds −(∂²_{hw}g)ᵀH⁻¹∇_w g = λH⁻¹∇_w g to λ(h − w):
    one Newton step, exact for a quadratic g — the exact meta-gradient from the inexact iterate,
    while the paper's λ(h − w̄) is off."""
    X, y, h = _task(n=8, d=3, seed=4)
    lam = 0.8
    w_bar = job.within_task_sgd(X, y, h, torch.tensor(lam, dtype=DT), "square")

    def g(w, hh):
        return job.regularised_risk(w, hh, X, y, lam)

    aid = bilevel.hypergrad(g, w_bar, h, inner_loss=g, solver=bilevel.CG(tol=1e-13), inner_tol=math.inf)
    exact = job.exact_meta_gradient(h, X, y, lam)
    torch.testing.assert_close(aid, exact, rtol=1e-9, atol=1e-12)
    assert (lam * (h - w_bar) - exact).norm() > 1e-3 * exact.norm()


def _sgd_loop(X, y, h, lam, loss):
    """The within-task algorithm written plainly, one step at a time."""
    w, iterates = h.clone(), []
    for k in range(len(y)):
        r = float(X[k] @ w - y[k])
        d = math.copysign(1.0, r) if loss == "absolute" and r != 0 else (0.0 if loss == "absolute" else r)
        w = w - (d * X[k] + lam * (w - h)) / (lam * (k + 1))
        iterates.append(w)
    return torch.stack(iterates).mean(0)


@pytest.mark.parametrize("loss", job.LOSSES)
def test_batched_sgd_matches_a_plain_loop(one_thread, loss):
    gen = torch.Generator().manual_seed(3)
    S, G, B, n, d = 2, 3, 4, 5, 3
    X = torch.randn(S, B, n, d, generator=gen, dtype=DT)
    y = torch.randn(S, B, n, generator=gen, dtype=DT)
    h = torch.randn(S, G, d, generator=gen, dtype=DT)
    lam = torch.tensor([0.3, 1.0, 4.0], dtype=DT)
    w = job.within_task_sgd(X[:, None], y[:, None], h[:, :, None], lam[None, :, None], loss)
    assert w.shape == (S, G, B, d)
    for s in range(S):
        for g in range(G):
            for b in range(B):
                torch.testing.assert_close(w[s, g, b], _sgd_loop(X[s, b], y[s, b], h[s, g], float(lam[g]), loss))
    # the meta-step is the paper's h − γλ(h − w̄_h)
    frac = torch.tensor([0.1, 0.5, 1.0], dtype=DT)
    h_next = job.online_meta_step(h, X[:, 0], y[:, 0], lam, frac, loss)
    for s in range(S):
        for g in range(G):
            w_bar = _sgd_loop(X[s, 0], y[s, 0], h[s, g], float(lam[g]), loss)
            torch.testing.assert_close(h_next[s, g], h[s, g] - frac[g] * (h[s, g] - w_bar))


def _numbers(res):
    return {k: (res[k]["learned"]["curve"], res[k]["independent"], res[k]["oracle"]) for k in job.PARTS}


def test_quick_run_end_to_end(tmp_path, capsys, one_thread):
    assert job.main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert "verdict" in capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "synthetic", "schools", "scales", "verdict", "total_seconds"} <= set(res)
    assert (tmp_path / "biased_reg.png").stat().st_size > 10_000
    for key in job.PARTS:
        p = res[key]
        curve = p["learned"]["curve"]
        assert [r["tasks"] for r in curve] == job.eval_points(job.QUICK["tasks"], job.QUICK["evals"])
        for r in curve:
            assert len(r["test_risk"]) == job.QUICK["seeds"] and all(map(math.isfinite, r["test_risk"]))
        assert p["meta_gradient_check"]["hypergrad_vs_closed_form_rel_err_max"] < 1e-9
    s = res["synthetic"]
    # h̄_1 = 0: the curve starts at independent task learning, and learning a bias helps
    assert s["learned"]["curve"][0]["mean"] == pytest.approx(s["independent"]["mean"])
    assert s["oracle"]["mean"] < s["learned"]["final_mean"] < s["independent"]["mean"]


def test_kill_and_resume_is_bit_identical(tmp_path, killed_at, one_thread):
    args = ["--quick", "--no-progress"]
    assert job.main([*args, "--out", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())

    revive = killed_at(job, "online_meta_step", 45)  # in the second part (30 tasks each in --quick)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        job.main([*args, "--out", str(out)])
    assert not (out / "results.json").exists()
    revive()
    assert job.main([*args, "--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert _numbers(resumed) == _numbers(full)

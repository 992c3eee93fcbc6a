"""bilevel run lr-schedule: the --quick run end to end, the forward-mode hypergradient of the
schedule against reverse mode and finite differences, and a kill-and-resume run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("sklearn")

import bilevel  # noqa: E402
from bilevel.apps import lr_schedule as job  # noqa: E402

QUICK = ["--quick", "--no-progress"]
TINY = job.Config(n_train=40, n_val=30, hidden=5, batch=8, train_steps=12, knots=3, block=3, lr0=0.3,
                  momentum0=0.6)


def test_quick_run(tmp_path, one_thread, capsys):
    assert job.main([*QUICK, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "lr_schedule.png").stat().st_size > 10_000
    cfg = job.Config(**job.QUICK)
    assert res["scales"]["log_lr_knots"] == "log" and res["scales"]["logit_momentum_knots"] == "logit"
    le, co = res["learned"], res["best_constant"]
    assert len(le["lr"]) == len(le["momentum"]) == cfg.train_steps
    assert len(le["log_lr_knots"]) == cfg.knots
    for r in (le, co, res["initial_constant"]):
        assert all(math.isfinite(r[k]) for k in ("train_loss", "val_loss", "test_loss", "test_acc"))
    # equal counted compute: the grid has (up to rounding to the momenta) steps · (1 + 2K) runs
    budget = cfg.steps * (1 + 2 * cfg.knots)
    assert budget - len(cfg.grid_momenta) < co["grid_size"] <= budget == le["training_run_equivalents"]
    # the best constant is the grid's argmin, and it is no worse than the initial constant
    assert co["val_loss"] == pytest.approx(min(r["val_loss"] for r in res["grid"]), rel=1e-5)
    assert len(res["history"]["val_loss"]) == cfg.steps
    assert le["val_loss"] == pytest.approx(min(res["history"]["val_loss"]), rel=1e-4)  # the best iterate
    curve = res["curves"]["learned"]
    assert curve["step"][-1] == cfg.train_steps and curve["val_loss"][-1] == pytest.approx(le["val_loss"], rel=1e-5)
    assert "verdict" in capsys.readouterr().out


def _tiny(dtype=torch.float64):
    data = job.load_data(TINY, dtype=dtype)
    hp = job.initial_hparams(TINY, dtype)
    gen = torch.Generator().manual_seed(3)
    hp = {k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in hp.items()}
    return data, hp


def _val_after_training(data, hp):
    """F(λ) by the plain training loop (no blocks, no forward mode): an independent path."""
    lr, mom = job.schedule(hp, job.knot_weights(TINY, torch.float64))
    return job.train(TINY, data, lr, mom)["val_loss"]


def test_forward_hypergrad_matches_reverse_mode_and_finite_differences(one_thread):
    data, hp = _tiny()
    hg, val = job.hypergradient(TINY, data, hp)
    assert float(val) == pytest.approx(_val_after_training(data, hp), rel=1e-12)
    # reverse mode through the same unrolled run
    hp_r = {k: v.clone().requires_grad_() for k, v in hp.items()}
    w_T = bilevel.unroll(job.make_step(TINY, data), job.init_state(TINY, data), hp_r, job.n_blocks(TINY),
                         indexed=True)
    rev = torch.autograd.grad(job.outer_loss_fn(data)(w_T, hp_r), [hp_r["log_lr"], hp_r["logit_momentum"]])
    for name, r in zip(("log_lr", "logit_momentum"), rev):
        torch.testing.assert_close(hg[name], r, rtol=1e-10, atol=1e-13)
    # central differences of the plain training loop, every knot
    eps = 1e-6
    for name in hp:
        assert float(hg[name].abs().max()) > 1e-4  # every knot matters: a test of zeros proves nothing
        for k in range(TINY.knots):
            plus = {n: v.clone() for n, v in hp.items()}
            minus = {n: v.clone() for n, v in hp.items()}
            plus[name][k] += eps
            minus[name][k] -= eps
            fd = (_val_after_training(data, plus) - _val_after_training(data, minus)) / (2 * eps)
            assert float(hg[name][k]) == pytest.approx(fd, rel=1e-6, abs=1e-9), (name, k)


def test_blocks_change_no_number(one_thread):
    """``block`` SGD steps per call of the step map is an overhead setting only."""
    data, hp = _tiny()
    one, _ = job.hypergradient(dataclasses.replace(TINY, block=1), data, hp)
    four, _ = job.hypergradient(dataclasses.replace(TINY, block=4), data, hp)
    for k in one:
        torch.testing.assert_close(one[k], four[k], rtol=1e-12, atol=1e-14)


def test_schedule_interpolates_the_knots():
    A = job.knot_weights(dataclasses.replace(TINY, train_steps=21, knots=3), torch.float64)
    lr, mom = job.schedule({"log_lr": torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64),
                            "logit_momentum": torch.zeros(3, dtype=torch.float64)}, A)
    assert torch.allclose(A.sum(1), torch.ones(21, dtype=torch.float64))  # a partition of unity
    assert lr[0] == pytest.approx(1.0) and lr[10] == pytest.approx(math.exp(-1)) and lr[20] == pytest.approx(
        math.exp(-2))
    assert lr[5] == pytest.approx(math.exp(-0.5))  # linear in log η between knots
    assert torch.allclose(mom, torch.full_like(mom, 0.5))


def _finals(res):
    return (res["learned"]["log_lr_knots"], res["learned"]["logit_momentum_knots"], res["history"]["val_loss"],
            res["grid"], {k: v for k, v in res["learned"].items() if k != "seconds"},
            {k: v for k, v in res["best_constant"].items() if k != "seconds"}, res["curves"])


def test_resume_gives_the_same_numbers(tmp_path, monkeypatch, one_thread):
    """Interrupted in outer step 2 and again inside the grid, resumed: the same numbers."""
    cfg = job.Config(**job.QUICK)
    full = job.run(cfg, tmp_path / "full", show=False)
    out = tmp_path / "cut"
    real_hg, real_train = job.hypergradient, job.train
    calls = {"hg": 0, "train": 0}

    def hg_cut(*a, **k):
        calls["hg"] += 1
        if calls["hg"] == 2:
            raise KeyboardInterrupt
        return real_hg(*a, **k)

    def train_cut(*a, **k):
        calls["train"] += 1
        if calls["train"] == 20:  # the timing run, then the grid's 19th
            raise KeyboardInterrupt
        return real_train(*a, **k)

    monkeypatch.setattr(job, "hypergradient", hg_cut)
    with pytest.raises(KeyboardInterrupt):
        job.run(cfg, out, show=False)
    monkeypatch.setattr(job, "hypergradient", real_hg)
    monkeypatch.setattr(job, "train", train_cut)
    with pytest.raises(KeyboardInterrupt):
        job.run(cfg, out, resume=True, show=False)
    monkeypatch.setattr(job, "train", real_train)
    resumed = job.run(cfg, out, resume=True, show=False)
    assert resumed["best_constant"]["grid_size"] > 16  # the grid was cut past its first checkpoint
    assert _finals(resumed) == _finals(full)

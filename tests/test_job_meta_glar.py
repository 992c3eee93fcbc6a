"""bilevel run meta-glar: the gradient through the closed-form ridge head against
bilevel.hypergrad, bilevel.implicit and finite differences; metrics on a hand example;
a --quick run end to end; kill-and-resume."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch.func import functional_call

import bilevel
from bilevel.apps import meta_glar as job

DT = torch.float64
TINY = job.Config(horizon=3, context=30, warmup=4, lags=(1, 2), hidden=3)


def _tiny(seed=0, B=2):
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(TINY.context + TINY.horizon, dtype=DT)
    values = 10 + 0.05 * t + torch.sin(2 * math.pi * t / 12) + 0.3 * torch.randn(B, len(t), generator=gen, dtype=DT)
    month = (t.long() % 12).expand(B, -1)
    torch.manual_seed(seed)
    enc = job.Encoder(TINY.hidden, TINY.lags).double()
    return enc, values, month


def _autograd(enc, log_lam, values, month, head):
    loss = job.glar_loss(enc, log_lam, values, month, dataclasses.replace(TINY, head=head))
    return torch.autograd.grad(loss, [*enc.parameters(), log_lam])


def test_ridge_closed_form_is_the_minimiser(one_thread):
    gen = torch.Generator().manual_seed(1)
    Phi = torch.randn(3, 9, 4, generator=gen, dtype=DT)
    Y = torch.randn(3, 9, 2, generator=gen, dtype=DT)
    log_lam = torch.tensor(-0.5, dtype=DT)
    W = job.ridge_closed_form(Phi, Y, log_lam)
    grad_w = torch.func.grad(job.ridge_loss)(W, (Phi, log_lam), Y)
    assert grad_w.abs().max() < 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_head_gradient_closed_form_implicit_hypergrad_agree(one_thread, seed):
    enc, values, month = _tiny(seed)
    log_lam = torch.tensor(math.log(0.7), dtype=DT, requires_grad=True)
    closed = _autograd(enc, log_lam, values, month, "closed-form")
    implicit = _autograd(enc, log_lam, values, month, "implicit")
    for a, b in zip(closed, implicit):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)

    # bilevel.hypergrad: params = the per-series heads W, hparams = (encoder weights, log λ)
    C = TINY.context
    z, _ = job.scaled(values, TINY)
    target = z[:, C:]

    def feats(theta):
        return functional_call(enc, theta, (z[:, :C], month[:, :C]))

    Y = job.ridge_rows(feats(dict(enc.named_parameters())), z, TINY)[1].detach()

    def inner_loss(W, hp):
        return job.ridge_loss(W, (job.ridge_rows(feats(hp[0]), z, TINY)[0], hp[1]), Y)

    def outer_loss(W, hp):
        pred = (feats(hp[0])[:, C - 1, None, :] @ W).squeeze(1) + z[:, C - 1, None]
        return ((pred - target) ** 2).mean()

    theta = {k: v.detach() for k, v in enc.named_parameters()}
    with torch.no_grad():
        Phi = job.ridge_rows(feats(theta), z, TINY)[0]
        W = job.ridge_closed_form(Phi, Y, log_lam.detach())
    hg_theta, hg_lam = bilevel.hypergrad(outer_loss, W, (theta, log_lam.detach()), inner_loss=inner_loss,
                                         solver=bilevel.Dense())
    names = [k for k, _ in enc.named_parameters()]
    for name, a in zip(names, closed[:-1]):
        torch.testing.assert_close(hg_theta[name], a, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(hg_lam, closed[-1], rtol=1e-7, atol=1e-12)


def test_head_gradient_matches_finite_differences(one_thread):
    enc, values, month = _tiny(2)
    log_lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    grads = _autograd(enc, log_lam, values, month, "closed-form")

    def loss(ll, shift=None):
        with torch.no_grad():
            if shift is not None:
                enc.gru.weight_hh_l0.add_(shift)
            out = float(job.glar_loss(enc, ll, values, month, TINY))
            if shift is not None:
                enc.gru.weight_hh_l0.sub_(shift)
        return out

    eps = 1e-6
    fd = (loss(log_lam.detach() + eps) - loss(log_lam.detach() - eps)) / (2 * eps)
    assert grads[-1].item() == pytest.approx(fd, rel=1e-5, abs=1e-10)
    # one random direction in the recurrent weights
    d = torch.randn(enc.gru.weight_hh_l0.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    names = [k for k, _ in enc.named_parameters()]
    g = grads[names.index("gru.weight_hh_l0")]
    fd_dir = (loss(log_lam.detach(), eps * d) - loss(log_lam.detach(), -eps * d)) / (2 * eps)
    assert float((g * d).sum()) == pytest.approx(fd_dir, rel=1e-5, abs=1e-10)


def test_metrics_on_a_hand_example():
    y = torch.tensor([[10.0, 20.0]], dtype=DT)
    yhat = torch.tensor([[12.0, 20.0]], dtype=DT)
    assert float(job.smape(y, yhat)) == pytest.approx((200 * 2 / 22 + 0) / 2)
    history = torch.arange(24, dtype=DT)  # seasonal-naive MAE in sample: 12
    assert job.mase_scale(history) == 12.0
    assert float(job.mase(y, yhat, torch.tensor([12.0], dtype=DT))) == pytest.approx(1 / 12)


def _numbers(res):
    return res["table"], {k: h["loss"] for k, h in res["history"].items()}


def test_quick_run_end_to_end(tmp_path, capsys, one_thread):
    assert job.main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert "verdict" in capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "data", "table", "history", "timings", "scales", "verdict"} <= set(res)
    assert (tmp_path / "meta_glar.png").stat().st_size > 10_000
    assert len(res["table"]) == 4
    for row in res["table"].values():
        assert len(row["mase_per_series"]) == job.QUICK["test_series"]
        assert all(map(math.isfinite, row["mase_per_series"] + row["smape_per_series"]))
    assert res["data"]["train_series"] + res["data"]["test_series"] == res["data"]["series"]


def test_kill_and_resume_is_bit_identical(tmp_path, killed_at, one_thread):
    args = ["--quick", "--no-progress"]
    assert job.main([*args, "--out", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())

    revive = killed_at(job, "training_batch", 9)  # the third step of the second model (6 steps each in --quick)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        job.main([*args, "--out", str(out)])
    revive()
    assert job.main([*args, "--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert _numbers(resumed) == _numbers(full)

"""The poison job: its hypergradient w.r.t. the poisoned pixels equals finite differences and a
dense float64 IFT solve on a tiny instance, the ascent step stays in the box, a --quick run
writes its results, and a run killed mid-way then resumed gives the same numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bilevel.apps import _runs
from bilevel.apps import poison as P

D = torch.float64


def tiny_data(n_train=10, n_val=8, n_poison=2, d=4, classes=3, seed=0) -> P.Data:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n_train + n_val, d, generator=gen, dtype=D)
    y = torch.randint(0, classes, (n_train + n_val,), generator=gen)
    start = torch.rand(n_poison, d, generator=gen, dtype=D)
    y_poison = torch.randint(0, classes, (n_poison,), generator=gen)
    return P.Data(X[:n_train], y[:n_train], X[n_train:], y[n_train:], X[n_train:], y[n_train:], start, y_poison,
                  torch.zeros(n_poison, dtype=torch.long), classes)


CFG = P.Config(l2=0.05, cg_tol=1e-12)


def solved(data, poison, params0=None):
    inner_loss, _ = P.make_losses(data, CFG)
    params0 = P.init_params(data) if params0 is None else params0
    params, info = P.bilevel.lbfgs(inner_loss, params0, poison, maxiter=2000, tol=1e-13, history=50)
    assert info.grad_norm < 1e-10
    return params


def outer_at(data, poison, params0):
    return float(P.cross_entropy(solved(data, poison, params0), data.X_val, data.y_val))


def test_hypergradient_matches_finite_differences(one_thread):
    data = tiny_data()
    poison = data.start
    params = solved(data, poison)
    hg, info = P.job_hypergrad(data, params, poison, CFG)
    assert info.converged and hg.shape == poison.shape
    fd, eps = torch.zeros_like(poison), 1e-5
    for i in range(poison.shape[0]):
        for j in range(poison.shape[1]):
            e = torch.zeros_like(poison)
            e[i, j] = eps
            fd[i, j] = (outer_at(data, poison + e, params) - outer_at(data, poison - e, params)) / (2 * eps)
    assert fd.abs().max() > 1e-3  # the test would notice a zero hypergradient
    assert torch.allclose(hg, fd, rtol=1e-5, atol=1e-9), (hg, fd)


def test_hypergradient_equals_a_dense_ift_solve(one_thread):
    data = tiny_data(seed=1)
    poison = data.start
    params = solved(data, poison)
    inner_loss, outer_loss = P.make_losses(data, CFG)
    (W, b), n_w = params, params[0].numel()
    unflat = lambda w: (w[:n_w].reshape(W.shape), w[n_w:])
    flat = torch.cat([W.reshape(-1), b])
    g = lambda w, p: inner_loss(unflat(w), p)
    hess = torch.func.hessian(g)(flat, poison)
    cross = torch.func.jacrev(torch.func.grad(g), argnums=1)(flat, poison)  # |w| × n_poison × d
    grad_f = torch.func.grad(lambda w: outer_loss(unflat(w), poison))(flat)
    exact = -torch.einsum("wpd,w->pd", cross, torch.linalg.solve(hess, grad_f))
    hg, _ = P.job_hypergrad(data, params, poison, CFG)
    assert torch.allclose(hg, exact, rtol=1e-8, atol=1e-12)


def test_ascent_step_moves_the_largest_pixel_by_lr_and_stays_in_the_box():
    poison = torch.tensor([[0.5, 0.95, 0.02]], dtype=D)
    grad = torch.tensor([[2.0, 1.0, -0.5]], dtype=D)
    new = P.ascent_step(poison, grad, 0.1)
    assert torch.allclose(new, torch.tensor([[0.6, 1.0, 0.0]], dtype=D))  # 0.95 + 0.05 and 0.02 − 0.025 clipped
    assert torch.equal(P.ascent_step(poison, torch.zeros_like(grad), 0.1), poison)


def test_poison_starts_from_training_images_with_wrong_labels():
    data = P.load_data(P.Config(**P.QUICK))
    assert torch.equal(data.start, data.X_train[data.source_index])
    assert (data.y_poison != data.y_train[data.source_index]).all()
    assert data.start.min() >= 0 and data.start.max() <= 1


def _numbers(out):
    res = json.loads((out / "results.json").read_text())
    hist = {k: v for k, v in res["history"].items() if not k.endswith("_seconds")}
    return res["test_accuracy"], res["baselines"], res["poison_points"]["final"], hist


def test_quick_run_writes_results(tmp_path, one_thread, capsys):
    assert P.main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["test_accuracy"]) == {"clean", "label_flips", "random_points", "poison"}
    assert all(math.isfinite(x) for x in [*res["test_accuracy"].values(), *res["drop"].values()])
    assert len(res["history"]["val_loss"]) == P.QUICK["steps"]
    assert res["history"]["val_loss"][-1] > res["history"]["val_loss"][0]  # the ascent raises the validation loss
    final = torch.tensor(res["poison_points"]["final"])
    assert final.shape == (P.QUICK["n_poison"], 64) and final.min() >= 0 and final.max() <= 1
    assert "scales" in res and (tmp_path / "poison.png").stat().st_size > 10_000
    assert "optimised poison" in capsys.readouterr().out


def test_killed_and_resumed_gives_the_same_numbers(tmp_path, one_thread, killed_at):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert P.main(["--quick", "--no-progress", "--out", str(whole)]) == 0

    revive = killed_at(P, "job_hypergrad", 3)
    with pytest.raises(KeyboardInterrupt):
        P.main(["--quick", "--no-progress", "--out", str(parts)])
    assert _runs.load_checkpoint(parts / "checkpoint.pt", P.CHECKPOINT_KEYS)["step"] == 2
    revive()
    assert P.main(["--quick", "--no-progress", "--out", str(parts), "--resume"]) == 0
    assert _numbers(parts) == _numbers(whole)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_refused_in_one_line(tmp_path):
    with pytest.raises(_runs.UserError, match="no CUDA GPU"):
        P.main(["--quick", "--no-progress", "--device", "cuda", "--out", str(tmp_path)])

"""The hyperclean job: its hypergradient is exact on tiny instances (linear: a dense float64
IFT solve and finite differences; MLP: finite differences of the re-solved local minimum),
a --quick run writes its results, and a run killed mid-way then resumed gives the same numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bilevel.apps import _runs
from bilevel.apps import hyperclean as H

D = torch.float64


def tiny_data(n_train=8, n_val=6, d=4, classes=3, seed=0) -> H.Data:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n_train + n_val, d, generator=gen, dtype=D)
    y = torch.randint(0, classes, (n_train + n_val,), generator=gen)
    corrupted = torch.arange(n_train) % 2 == 0
    return H.Data(X[:n_train], y[:n_train], y[:n_train], corrupted, X[n_train:], y[n_train:], X[n_train:], y[n_train:],
                  classes, (2, 2), "test")


def solved(data, cfg, lam, params0=None):
    inner_loss, _ = H.make_losses(data, cfg)
    params0 = H.init_params(data, cfg) if params0 is None else params0
    params, info = H.bilevel.lbfgs(inner_loss, params0, lam, maxiter=2000, tol=1e-13, history=50)
    assert info.grad_norm < 1e-10
    return params


def outer_at(data, cfg, lam, params0):
    _, outer_loss = H.make_losses(data, cfg)
    return float(outer_loss(solved(data, cfg, lam, params0), lam))


def finite_differences(data, cfg, lam, params, eps=1e-5):
    """Central differences of F(λ) = CE_val(w(λ)), each w(λ ± ε eᵢ) re-solved from ``params``."""
    fd = torch.zeros_like(lam)
    for i in range(len(lam)):
        e = torch.zeros_like(lam)
        e[i] = eps
        fd[i] = (outer_at(data, cfg, lam + e, params) - outer_at(data, cfg, lam - e, params)) / (2 * eps)
    return fd


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_hypergradient_matches_finite_differences(one_thread, model):
    data = tiny_data()
    cfg = H.Config(model=model, hidden=3, l2=0.05, cg_tol=1e-12)
    lam = torch.linspace(-1.5, 2.0, len(data.y_train), dtype=D)
    params = solved(data, cfg, lam)
    hg, info = H.job_hypergrad(data, params, lam, cfg)
    assert info.converged
    fd = finite_differences(data, cfg, lam, params)
    assert fd.abs().max() > 1e-3  # the test would notice a zero hypergradient
    assert torch.allclose(hg, fd, rtol=1e-5, atol=1e-8), (hg, fd)


def test_linear_hypergradient_equals_a_dense_ift_solve(one_thread):
    """∇F = −(∂²_{λw} g)ᵀ H⁻¹ ∇_w F with the Hessian built densely and solved in float64."""
    data = tiny_data()
    cfg = H.Config(l2=0.05, cg_tol=1e-12)
    lam = torch.linspace(-1.0, 1.0, len(data.y_train), dtype=D)
    params = solved(data, cfg, lam)
    inner_loss, outer_loss = H.make_losses(data, cfg)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def unflat(flat):
        return tuple(c.reshape(s) for c, s in zip(flat.split(sizes), shapes, strict=True))

    flat = torch.cat([p.reshape(-1) for p in params])
    g = lambda w, lam_: inner_loss(unflat(w), lam_)
    hess = torch.func.hessian(g)(flat, lam)
    cross = torch.func.jacrev(torch.func.grad(g), argnums=1)(flat, lam)  # ∂²g/∂w∂λ: |w| × |λ|
    grad_f = torch.func.grad(lambda w: outer_loss(unflat(w), lam))(flat)
    exact = -cross.T @ torch.linalg.solve(hess, grad_f)
    hg, _ = H.job_hypergrad(data, params, lam, cfg)
    assert torch.allclose(hg, exact, rtol=1e-8, atol=1e-12)


def test_flagging_counts():
    w = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.4])
    bad = torch.tensor([True, True, False, False, True])
    f = H.flagging(w, bad, 0.5)
    # flagged: 0, 2, 4; true positives 0, 4
    assert (f["precision"], f["recall"]) == (2 / 3, 2 / 3) and math.isclose(f["f1"], 2 / 3)


def test_corruption_changes_exactly_the_flagged_labels():
    cfg = H.Config(**H.QUICK)
    data = H.load_data(cfg)
    assert torch.equal(data.y_train != data.y_true, data.corrupted)  # flipped to a different class
    assert 0.3 < data.corrupted.float().mean() < 0.7
    assert len(data.y_train) == cfg.n_train and len(data.y_val) == cfg.n_val and len(data.y_test) == cfg.n_test


def _numbers(out):
    res = json.loads((out / "results.json").read_text())
    hist = {k: v for k, v in res["history"].items() if not k.endswith("_seconds")}
    return res["test_accuracy"], res["flagging"], res["weights"]["lam"], hist


def _check_results(out, cfg):
    res = json.loads((out / "results.json").read_text())
    assert set(res["test_accuracy"]) == {"noisy", "val_only", "hyperclean", "oracle"}
    assert res["scales"]["lam"] == "logit"
    assert res["config"]["model"] == cfg.model and res["data"]["n_hparams"] == cfg.n_train
    nums = [*res["test_accuracy"].values(), *res["flagging"].values(), *res["history"]["outer_loss"]]
    assert all(math.isfinite(x) for x in nums)
    assert len(res["history"]["outer_loss"]) == cfg.steps
    assert res["history"]["outer_loss"][-1] < res["history"]["outer_loss"][0]  # Adam lowers the validation loss
    assert (out / "hyperclean.png").stat().st_size > 10_000


def test_quick_run_writes_results(tmp_path, one_thread, capsys):
    assert H.main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    _check_results(tmp_path, H.Config(**H.QUICK))
    assert "oracle" in capsys.readouterr().out


def test_mlp_run_writes_results(tmp_path, one_thread):
    # short inner solves keep the test fast (the MLP's L-BFGS then warns that it stopped early)
    cfg = H.Config(**{**H.QUICK, "model": "mlp", "steps": 3, "n_train": 60, "inner_maxiter": 40})
    with pytest.warns(H.bilevel.ConvergenceWarning):
        H.run(cfg, tmp_path, show=False)
    _check_results(tmp_path, cfg)


def test_killed_and_resumed_gives_the_same_numbers(tmp_path, one_thread, killed_at):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert H.main(["--quick", "--no-progress", "--out", str(whole)]) == 0

    revive = killed_at(H, "job_hypergrad", 3)
    with pytest.raises(KeyboardInterrupt):
        H.main(["--quick", "--no-progress", "--out", str(parts)])
    assert _runs.load_checkpoint(parts / "checkpoint.pt", H.CHECKPOINT_KEYS)["step"] == 2
    revive()
    assert H.main(["--quick", "--no-progress", "--out", str(parts), "--resume"]) == 0
    assert _numbers(parts) == _numbers(whole)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_refused_in_one_line(tmp_path):
    with pytest.raises(_runs.UserError, match="no CUDA GPU"):
        H.main(["--quick", "--no-progress", "--device", "cuda", "--out", str(tmp_path)])


def test_absent_dataset_is_one_line(tmp_path):
    with pytest.raises(_runs.UserError, match="no mnist IDX files found"):
        H.main(["--quick", "--no-progress", "--dataset", "mnist", "--data-dir", str(tmp_path / "none"),
                "--out", str(tmp_path / "out")])

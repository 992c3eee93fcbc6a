"""The main job (`bilevel demo` = `bilevel run ho-digits`): end to end, resume, and its hypergradient."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from bilevel.apps import _runs
from bilevel.apps import ho_digits as H


def _finite_numbers(x, path="results"):
    """Yield (path, value) for every number in a JSON tree."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _finite_numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


@pytest.fixture(scope="module")
def quick_run(one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert H.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_job_writes_results_and_plot(quick_run, capsys):
    res = json.loads((quick_run / "results.json").read_text())
    assert res["scales"]["learned.lam"] == "log" and res["scales"]["config.box"] == "log10"
    for key in ("config", "data", "no_regularisation", "grid_search", "learned", "history",
                "hypergrad", "timings", "verdict"):
        assert key in res, key
    steps = res["config"]["steps"]
    assert steps == H.QUICK["steps"]
    for key in ("outer_loss", "test_loss", "cg_iterations", "cg_residual", "inner_residual"):
        assert len(res["history"][key]) == steps, key
    for row in (res["no_regularisation"], res["grid_search"]["best"], res["learned"]):
        assert {"val_loss", "val_acc", "test_loss", "test_acc"} <= row.keys()
    d = res["data"]
    assert len(res["learned"]["lam"]) == d["n_hparams"] == d["n_real"] + d["n_noise"]
    assert res["grid_search"]["inner_solves"] == res["learned"]["inner_solves"] == steps + 1
    bad = [p for p, v in _finite_numbers(res) if not math.isfinite(v)]
    assert not bad, bad
    # the job did optimise: the outer loss went down and every linear solve converged
    assert res["history"]["outer_loss"][-1] < res["history"]["outer_loss"][0]
    assert res["hypergrad"]["all_converged"]
    png = (quick_run / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (quick_run / "checkpoint.pt").exists()


def test_full_config_meets_the_brief():
    """≥100 noise features and ≥164 hyperparameters in the default job (no solve needed)."""
    cfg = H.Config()
    data = H.load_data(cfg)
    assert cfg.n_noise >= 100
    assert data.X_train.shape[1] >= 164 and int((~data.real).sum()) == cfg.n_noise
    # standardised on the training split
    torch.testing.assert_close(data.X_train.mean(0), torch.zeros(data.X_train.shape[1], dtype=H.DTYPE))
    torch.testing.assert_close(data.X_train.std(0), torch.ones(data.X_train.shape[1], dtype=H.DTYPE))
    assert len(data.y_test) == 1797 - cfg.n_train - cfg.n_val


def test_resume_after_interrupt_gives_the_same_lambda(quick_run, tmp_path, killed_at):
    """Crash inside step 4 of 6, resume from the checkpoint of step 3: same final λ."""
    full = torch.tensor(json.loads((quick_run / "results.json").read_text())["learned"]["lam"])

    revive = killed_at(H, "job_hypergrad", 4)
    with pytest.raises(KeyboardInterrupt):
        H.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert _runs.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    revive()

    assert H.main(["--quick", "--out", str(tmp_path), "--no-progress", "--resume"]) == 0
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert len(resumed["history"]["outer_loss"]) == H.QUICK["steps"]
    torch.testing.assert_close(torch.tensor(resumed["learned"]["lam"]), full, rtol=1e-10, atol=1e-12)


def test_resume_refuses_other_settings(quick_run):
    with pytest.raises(ValueError, match="other settings"):
        H.main(["--quick", "--seed", "1", "--out", str(quick_run), "--no-progress", "--resume"])


def _tiny(seed=0):
    """The job's data restricted to 5 pixels + 3 noise features: a dense Hessian is cheap."""
    cfg = H.Config(n_noise=3, n_train=60, n_val=60, seed=seed, inner_tol=1e-8, inner_maxiter=1000,
                   cg_tol=1e-12, cg_maxiter=500)
    data = H.load_data(cfg)
    cols = torch.cat([torch.tensor([10, 20, 27, 36, 43]), torch.arange(-3, 0) % data.X_train.shape[1]])
    data = dataclasses.replace(
        data,
        X_train=data.X_train[:, cols], X_val=data.X_val[:, cols], X_test=data.X_test[:, cols],
        real=data.real[cols], pixels=data.pixels[cols[:5]],
    )
    lam = torch.linspace(math.log(1e-2), math.log(3.0), len(cols), dtype=H.DTYPE)
    return cfg, data, lam


def _flat(tree):
    return torch.cat([t.reshape(-1) for t in tree])


def test_job_hypergradient_matches_dense_ift_and_finite_differences():
    cfg, data, lam = _tiny()
    inner_loss, outer_loss = H.make_losses(data)
    W0, b0 = H.init_params(data)
    n_w = W0.numel()

    def unflat(x):
        return x[:n_w].reshape(W0.shape), x[n_w:]

    def solve_exact(lam_, start):
        """The job's L-BFGS, then Newton steps with the dense (pseudo-)inverse Hessian."""
        p, _ = H.solve_inner(inner_loss, start, lam_, maxiter=cfg.inner_maxiter, tol=cfg.inner_tol)
        x = _flat(p)
        for _ in range(3):
            gx = torch.func.grad(lambda x: inner_loss(unflat(x), lam_))(x)
            hx = torch.func.hessian(lambda x: inner_loss(unflat(x), lam_))(x)
            x = x - torch.linalg.pinv(hx, hermitian=True, rtol=1e-13) @ gx
        return unflat(x)

    params = solve_exact(lam, (W0, b0))
    assert _flat(torch.func.grad(inner_loss)(params, lam)).norm() < 1e-12
    hg, info = H.job_hypergrad(data, params, lam, cfg)
    assert info.converged

    # dense IFT, written independently: v = H⁺ ∇_w f (H is singular along the softmax
    # shift of the unpenalised bias, and ∇_w f is orthogonal to it), then
    # ∂F/∂λ_j = −e^{λ_j} ⟨W_j, v_{W_j}⟩ since ∂(∇_{W_j} g)/∂λ_j = e^{λ_j} W_j
    x = _flat(params)
    hess = torch.func.hessian(lambda x: inner_loss(unflat(x), lam))(x)
    gw = torch.func.grad(lambda x: outer_loss(unflat(x), lam))(x)
    vW, _ = unflat(torch.linalg.pinv(hess, hermitian=True, rtol=1e-13) @ gw)
    dense = -lam.exp() * (params[0] * vW).sum(1)
    torch.testing.assert_close(hg, dense, rtol=1e-8, atol=1e-12)
    assert hg.abs().min() > 1e-6  # every coordinate is exercised

    # central finite differences of F(λ) = CE_val(w(λ)) along a random direction and two
    # coordinates (a pixel and a noise feature)
    def F(lam_):
        return float(outer_loss(solve_exact(lam_, params), lam_))

    eps = 1e-4
    u = torch.randn(len(lam), generator=torch.Generator().manual_seed(0), dtype=H.DTYPE)
    eye = torch.eye(len(lam), dtype=H.DTYPE)
    for direction in (u / u.norm(), eye[1], eye[-1]):
        fd = (F(lam + eps * direction) - F(lam - eps * direction)) / (2 * eps)
        assert fd == pytest.approx(float(hg @ direction), rel=1e-6)


def test_grid_search_picks_the_best_validation_loss():
    cfg, data, _ = _tiny()
    cfg = dataclasses.replace(cfg, box=(-2.0, 1.0))
    grid = H.grid_search(data, cfg, 5)
    vals = [r["val_loss"] for r in grid["grid"]]
    assert grid["best"]["val_loss"] == min(vals) and len(vals) == 5
    lams = [r["lambda"] for r in grid["grid"]]
    assert lams[0] == pytest.approx(10 ** cfg.box[1]) and lams[-1] == pytest.approx(10 ** cfg.box[0])

"""Outer loops (bilevel solvers) on a strongly convex quadratic bilevel problem with closed-form λ*.

Problem (``bilevel.apps.sample_complexity``): ``w(λ) = H⁻¹(Σw̄ + Bλ)``, ``F(λ)`` quadratic,
``λ* = −(MᵀΣM + μI)⁻¹MᵀΣ(H⁻¹Σw̄ − w̄)``.  Deterministic solvers must reach
``‖λ − λ*‖ ≤ 1e-3``; the stochastic ones (fixed seeds) the tolerances stated below.
"""

import math

import pytest
import torch

import bilevel as bl
from bilevel.apps.sample_complexity import GaussianBatches, make_problem

DT = torch.float64
D, M = 6, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


@pytest.fixture(scope="module")
def prob():
    return make_problem(D, M, seed=3)


def _inner_loss(p):
    """g(w, λ) = ½wᵀHw − wᵀ(Σw̄ + Bλ): the gradient step of size η is p.fixed_point_full."""
    return lambda w, lam: 0.5 * w @ p.H @ w - w @ (p.cov @ p.w_bar + p.B @ lam)


def _lr(p):
    return 1.0 / float(torch.linalg.eigvalsh(p.hessian_F()).max())


def _dist(lam, p):
    return float((lam - p.lam_star()).norm())


def test_closed_form_of_the_problem(prob):
    p = prob

    def F(lam):
        return p.outer_loss_full(p.solution(lam), lam)

    lam = torch.randn(M, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.func.grad(F)(lam), p.grad_F(lam), atol=1e-13)
    assert float(torch.func.grad(F)(p.lam_star()).norm()) < 1e-13
    assert torch.allclose(torch.func.hessian(F)(lam), p.hessian_F(), atol=1e-12)
    w = p.solution(lam)
    assert torch.allclose(p.fixed_point_full(w, lam), w, atol=1e-13)
    assert p.contraction() < 1
    # the batch maps are unbiased: a batch of the exact population moments reproduces them
    X = torch.linalg.cholesky(p.cov).T * math.sqrt(D)  # XᵀX/D = Σ
    batch = (X, X @ p.w_bar)
    assert torch.allclose(p.fixed_point(w, lam, batch), w, atol=1e-12)


def _w0():
    return torch.zeros(D, dtype=DT)


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("form", ["fixed_point", "inner_loss"])
def test_aid_outer_loop_reaches_lam_star(prob, form, warm):
    p = prob
    kw = {"fixed_point": p.fixed_point_full} if form == "fixed_point" else {
        "inner_loss": _inner_loss(p), "inner_step_size": p.eta}
    solver = bl.AIDBilevel(p.outer_loss_full, _w0(), lr=_lr(p), inner_steps=40, warm_start=warm, **kw)
    state, infos = solver.run(torch.zeros(M, dtype=DT), 15)
    assert _dist(state.hparams, p) <= 1e-3
    assert infos[-1].hypergrad_norm < 1e-3 and infos[-1].linear_residual < 1e-8
    assert infos[-1].inner_residual < 1e-10
    assert infos[-1].total_samples == sum(i.samples for i in infos)


@pytest.mark.parametrize("warm", [False, True])
def test_itd_outer_loop_reaches_lam_star(prob, warm):
    p = prob
    solver = bl.ITDBilevel(p.outer_loss_full, _w0(), fixed_point=p.fixed_point_full, lr=_lr(p), inner_steps=35,
                           warm_start=warm)
    state, infos = solver.run(torch.zeros(M, dtype=DT), 15)
    assert _dist(state.hparams, p) <= 1e-3
    assert math.isnan(infos[-1].linear_residual) and infos[-1].inner_residual < 1e-10
    # SGD form with a step size, truncated back-propagation: still the exact limit here
    solver = bl.ITDBilevel(p.outer_loss_full, _w0(), inner_loss=_inner_loss(p), inner_step_size=p.eta,
                           lr=_lr(p), inner_steps=40, truncate=20)
    assert _dist(solver.run(torch.zeros(M, dtype=DT), 15)[0].hparams, p) <= 1e-3


def test_warm_start_carries_the_inner_and_linear_states(prob):
    """Two inner and two linear steps per outer step only converge if they are carried over."""
    p = prob
    common = dict(fixed_point=p.fixed_point_full, lr=0.5 * _lr(p), inner_steps=2,
                  solver=bl.FixedPoint(maxiter=2, tol=0.0))
    warm, _ = bl.AIDBilevel(p.outer_loss_full, _w0(), warm_start=True, **common).run(torch.zeros(M, dtype=DT), 60)
    cold, _ = bl.AIDBilevel(p.outer_loss_full, _w0(), warm_start=False, **common).run(torch.zeros(M, dtype=DT), 60)
    assert _dist(warm.hparams, p) <= 1e-3
    assert _dist(cold.hparams, p) > 1e-2  # the bias of 2 steps from w = 0, v = 0


def _stochastic(p, warm, batch=256, seed=0, **kw):
    opts = dict(lr=0.5 * _lr(p), inner_steps=2 if warm else 8, linear_steps=2 if warm else 8)
    opts.update(kw)
    return bl.StochasticBilevel(
        p.outer_loss, _w0(), GaussianBatches(p, batch, 2 * seed), fixed_point=p.fixed_point,
        outer_batches=GaussianBatches(p, batch, 2 * seed + 1), warm_start=warm, **opts,
    )


@pytest.mark.parametrize("warm", [False, True])
def test_stochastic_solvers_get_close_to_lam_star(prob, warm):
    """Batches of 256: ‖λ − λ*‖ ≤ 0.1 (‖λ*‖ ≈ 0.5; noise floor ~0.03 here); fixed seed."""
    p = prob
    state, infos = _stochastic(p, warm).run(torch.zeros(M, dtype=DT), 30 if warm else 15)
    assert _dist(state.hparams, p) <= 0.1, (_dist(state.hparams, p), float(p.lam_star().norm()))
    t = 2 if warm else 8
    assert all(i.samples == 256 * (t + 2 * t + 2) for i in infos)  # noqa: E501  # inner t + k + 1, outer k + 1
    assert state.samples == infos[-1].total_samples == sum(i.samples for i in infos)
    assert all(math.isfinite(i.inner_residual) and math.isfinite(i.linear_residual) for i in infos)
    if warm:  # a decreasing outer step (Robbins–Monro) averages the noise out further
        state, _ = _stochastic(p, warm, lr=bl.DecreasingStep(2.0 * _lr(p), 2.0)).run(torch.zeros(M, dtype=DT), 40)
        assert _dist(state.hparams, p) <= 0.05


def test_user_owned_loop_and_reported_quantities(prob):
    p = prob
    solver = _stochastic(p, False, batch=64)
    state = solver.init(torch.zeros(M, dtype=DT))
    lr = 0.5 * _lr(p)
    for s in range(3):
        new, info = solver.step(state)
        assert info.step == s and new.step == s + 1
        # λ_{s+1} = λ_s − α ĝ_s: the step taken has length α‖ĝ_s‖
        assert math.isclose(float((new.hparams - state.hparams).norm()), lr * info.hypergrad_norm, rel_tol=1e-10)
        assert state.step == s  # the old state is not mutated
        state = new
    assert state.params.shape == (D,) and state.v.shape == (D,)
    inner, outer = state.streams
    assert inner.samples + outer.samples == state.samples


def test_projection_box_and_callable(prob):
    p = prob
    box = bl.Box(-0.1, 0.1)
    # reference: projected gradient descent on the exact quadratic F
    lam = torch.zeros(M, dtype=DT)
    for _ in range(200):
        lam = torch.clamp(lam - _lr(p) * p.grad_F(lam), -0.1, 0.1)
    assert float((lam - p.lam_star()).norm()) > 0.05  # the box is active
    state, _ = bl.AIDBilevel(p.outer_loss_full, _w0(), fixed_point=p.fixed_point_full, lr=_lr(p), inner_steps=40,
                             projection=box).run(torch.ones(M, dtype=DT), 20)
    assert float((state.hparams - lam).norm()) <= 1e-6
    state, infos = _stochastic(p, False, batch=16, projection=box).run(torch.ones(M, dtype=DT), 3)
    assert float(state.hparams.abs().max()) <= 0.1 and len(infos) == 3
    # a callable projection, on a pytree of hparams
    solver = bl.AIDBilevel(lambda w, lam: p.outer_loss_full(w, lam["a"]), _w0(),
                           fixed_point=lambda w, lam: p.fixed_point_full(w, lam["a"]), lr=_lr(p), inner_steps=30,
                           projection=lambda lam: {"a": lam["a"].clamp(max=0.0)})
    state, _ = solver.run({"a": torch.zeros(M, dtype=DT)}, 5)
    assert float(state.hparams["a"].max()) <= 0.0


def test_bad_options(prob):
    p = prob
    fp, fo = p.fixed_point_full, p.outer_loss_full
    for lr in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="> 0"):
            bl.AIDBilevel(fo, _w0(), fixed_point=fp, lr=lr)
        with pytest.raises(ValueError, match="> 0"):
            _stochastic(p, False, lr=lr)
    with pytest.raises(ValueError, match="> 0"):
        _stochastic(p, False, inner_step_size=0.0)
    with pytest.raises(TypeError):
        bl.ITDBilevel(fo, _w0(), fixed_point=fp, lr="0.1")
    with pytest.raises(ValueError, match="exactly one"):
        bl.AIDBilevel(fo, _w0())
    with pytest.raises(ValueError, match="linear_steps"):
        _stochastic(p, False, linear_steps=0)
    with pytest.raises(ValueError, match="lower should be <= upper"):
        bl.Box(1.0, 0.0)
    with pytest.raises(TypeError, match="projection"):
        bl.AIDBilevel(fo, _w0(), fixed_point=fp, projection="box")
    bad = bl.AIDBilevel(fo, _w0(), fixed_point=fp, inner_steps=5, projection=lambda lam: lam[:1])
    with pytest.raises(ValueError, match="shaped like hparams"):
        bad.run(torch.zeros(M, dtype=DT), 1)
    solver = _stochastic(p, False)
    state = bl.AIDBilevel(fo, _w0(), fixed_point=fp).init(torch.zeros(M, dtype=DT))
    with pytest.raises(ValueError, match="no data streams"):
        solver.step(state)
    with pytest.raises(bl.NotContractionError):
        bl.AIDBilevel(fo, _w0(), fixed_point=fp, inner_step_size=5.0, inner_steps=50).run(torch.zeros(M, dtype=DT), 1)


def test_sample_complexity_job_quick_and_resume(tmp_path, capsys):
    import json

    from bilevel.apps import sample_complexity as job

    out = tmp_path / "sc"
    assert job.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "sample_complexity.png").stat().st_size > 0
    assert set(res["curves"]) == set(job.METHODS)
    for curve in res["curves"].values():
        samples = [p["samples"] for p in curve["points"]]
        assert samples == sorted(samples) and len(samples) == job.QUICK["levels"]
        assert curve["slope_lam_err2"] < 0  # more samples, smaller error
    assert "slopes" in capsys.readouterr().out
    # --resume: every run is in the checkpoint, nothing is recomputed, same numbers
    assert job.main(["--quick", "--out", str(out), "--no-progress", "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["curves"] == res["curves"]
    with pytest.raises(ValueError, match="other settings"):
        job.main(["--quick", "--reps", "3", "--out", str(out), "--no-progress", "--resume"])

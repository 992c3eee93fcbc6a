"""NSID (Grazzi, Pontil & Salzo, ICML 2024) on a synthetic elastic net whose exact
hypergradient is a dense float64 solve: the deterministic limit, the O(1/k) rate, the
stochastic inner solver, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from problems import rel_err

import bilevel
from bilevel import nonsmooth as N
from bilevel import prox as P
from bilevel.stochastic import BatchStream, DataExhaustedError, DecreasingStep

torch.set_default_dtype(torch.float64)  # module data at import; conftest.py scopes it per test


def _problem(n=500, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X[:, 1] += 0.8 * X[:, 0]  # correlated features: a slower contraction (q ≈ 0.5)
    w_true = torch.tensor([1.5, -1.0, 0.0, 0.7, 0.0])
    y = X @ w_true + 0.5 * torch.randn(n, generator=g)
    Xv = torch.randn(100, d, generator=g)
    yv = Xv @ w_true + 0.5 * torch.randn(100, generator=g)
    L = torch.linalg.eigvalsh(X.T @ X / n).max().item()
    theta = torch.tensor([-2.0, -1.0])  # (log α₁, log α₂)

    def prox(u, th, eta):
        return P.prox_elastic_net(u, eta * th[0].exp(), eta * th[1].exp())

    def batch_loss(w, th, idx):
        return 0.5 * ((X[idx] @ w - y[idx]) ** 2).mean()

    def outer(w, th):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    full = torch.arange(n)
    phi = P.proximal_gradient(lambda w, th: batch_loss(w, th, full), prox, 1 / L)
    w, info = N.fista(phi, torch.zeros(d), theta, tol=1e-14)
    assert info.converged and 0 < int((w != 0).sum()) < d
    exact = bilevel.hypergrad(outer, w, theta, fixed_point=phi, solver=bilevel.Dense())
    comp = N.proximal_gradient_composite(batch_loss, prox, 1 / L)
    return dict(phi=phi, comp=comp, outer=outer, w=w, theta=theta, exact=exact, full=full, n=n,
                batch_loss=batch_loss, prox=prox, L=L, X=X)


@pytest.fixture(scope="module")
def pb():
    return _problem()


def _random_batches(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, n, (size,), generator=g)


def test_full_batch_unit_step_is_aid_fixed_point(pb):
    # large-batch limit, exactly: every batch the full data, η_i = 1 -> AID-FP, step for step
    for k in (3, 80):
        a = N.nsid(pb["outer"], pb["w"], pb["theta"], [pb["full"]], fixed_point=pb["comp"],
                   mean_batch=pb["full"], steps=k, step_size=1.0)
        b = bilevel.hypergrad(pb["outer"], pb["w"], pb["theta"], fixed_point=pb["phi"],
                              solver=bilevel.FixedPoint(maxiter=k, tol=0.0))
        assert rel_err(a, b) <= 1e-13
    assert rel_err(a, pb["exact"]) <= 1e-10


def test_full_batches_with_paper_steps_converge_to_the_deterministic_value(pb):
    # default steps η_i = β/(γ + i), β = γ = 2/(1 − q²); with noiseless (full) batches the error
    # is ∏(1 − η_i(1 − q)) ~ k^(−β(1−q)), faster than 1/k
    errs = []
    for k in (100, 300):
        hg, info = N.nsid(pb["outer"], pb["w"], pb["theta"], [pb["full"]], fixed_point=pb["comp"],
                          mean_batch=pb["full"], steps=k, return_info=True)
        errs.append(rel_err(hg, pb["exact"]))
    assert 0.3 < info.q < 1 and info.samples == 300 * 500 and info.steps == 300
    assert errs[1] <= 5e-3 and errs[1] <= errs[0] / 3 ** 0.9


def test_error_decreases_at_least_at_the_papers_rate(pb):
    # E‖∇̂F − ∇F‖² = O(1/k) with w exact (Grazzi, Pontil & Salzo 2024): going from k to 16k
    # steps must cut the mean squared error by >= 16^0.8; a biased estimator plateaus instead.
    # Batches of 50, so that each minibatch map is a contraction as the analysis assumes.
    reps, ks = 4, (50, 800)
    mse = []
    for k in ks:
        tot = 0.0
        for seed in range(reps):
            hg = N.nsid(pb["outer"], pb["w"], pb["theta"], _random_batches(pb["n"], 50, 100 + seed),
                        fixed_point=pb["comp"], mean_batch=pb["full"], steps=k)
            tot += float(((hg - pb["exact"]) ** 2).sum())
        mse.append(tot / reps)
    slope = math.log(mse[1] / mse[0]) / math.log(ks[1] / ks[0])
    assert slope <= -0.8, (mse, slope)
    assert mse[1] / float((pb["exact"] ** 2).sum()) <= 1e-4


def test_stochastic_inner_solver_then_nsid(pb):
    mu = torch.linalg.eigvalsh(pb["X"].T @ pb["X"] / pb["n"]).min().item()
    sched = DecreasingStep(2 / mu, 2 * pb["L"] / mu)  # η_0 = 1/L
    errs = []
    for steps in (100, 1000):  # E‖w_t − w‖² = O(1/t): the error should fall ~√10-fold
        stream = BatchStream(_random_batches(pb["n"], 10, 7))
        w = N.stochastic_proximal_gradient(torch.zeros(5), pb["theta"], stream, batch_loss=pb["batch_loss"],
                                           prox=pb["prox"], steps=steps, step_size=sched)
        assert stream.samples == 10 * steps
        errs.append(float((w - pb["w"]).norm() / pb["w"].norm()))
    assert errs[1] < 0.04 and errs[1] < errs[0] / 2.5
    hg = N.nsid(pb["outer"], w, pb["theta"], _random_batches(pb["n"], 10, 8), fixed_point=pb["comp"],
                mean_batch=pb["full"], steps=300)
    assert rel_err(hg, pb["exact"]) <= 0.05


def test_dataloader_batches_and_warm_start(pb):
    ds = torch.utils.data.TensorDataset(pb["full"])
    loader = torch.utils.data.DataLoader(ds, batch_size=100, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    comp = N.proximal_gradient_composite(lambda w, th, b: pb["batch_loss"](w, th, b[0]), pb["prox"],
                                         1 / pb["L"])
    hg, info = N.nsid(pb["outer"], pb["w"], pb["theta"], loader, fixed_point=comp,
                      mean_batch=[pb["full"]], steps=60, return_info=True)  # 12 epochs, cycled
    assert info.samples == 6000 and rel_err(hg, pb["exact"]) <= 0.05
    hg2 = N.nsid(pb["outer"], pb["w"], pb["theta"], loader, fixed_point=comp,
                 mean_batch=[pb["full"]], steps=20, init=info.v, step_size=DecreasingStep(1.0, 60.0))
    assert rel_err(hg2, pb["exact"]) <= 0.05


def test_default_steps_are_the_papers_schedule(pb):
    stream = lambda: _random_batches(pb["n"], 50, 3)  # noqa: E731
    kw = dict(fixed_point=pb["comp"], mean_batch=pb["full"], steps=30)
    h1, info = N.nsid(pb["outer"], pb["w"], pb["theta"], stream(), return_info=True, **kw)
    # q = ‖∂_wΦ‖₂ at w, i.e. the largest singular value of the dense Jacobian
    J = torch.func.jacrev(lambda w: pb["phi"](w, pb["theta"]))(pb["w"])
    assert info.q == pytest.approx(torch.linalg.matrix_norm(J, 2).item(), rel=1e-6)
    h2 = N.nsid(pb["outer"], pb["w"], pb["theta"], stream(), step_size=DecreasingStep.for_contraction(info.q), **kw)
    assert torch.equal(h1, h2)


def test_bad_input(pb):
    kw = dict(fixed_point=pb["comp"], mean_batch=pb["full"], steps=5)
    args = (pb["outer"], pb["w"], pb["theta"])
    with pytest.raises(DataExhaustedError, match="empty"):
        N.nsid(*args, [], **kw)
    with pytest.raises(DataExhaustedError, match="ran out"):
        N.nsid(*args, iter([pb["full"]] * 2), **kw)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        N.nsid(*args, [pb["full"]], step_size=DecreasingStep(4.0, 1.0), **kw)
    with pytest.raises(TypeError, match="CompositeMap"):
        N.nsid(*args, [pb["full"]], fixed_point=pb["phi"], mean_batch=pb["full"], steps=5)
    with pytest.raises(ValueError, match="steps"):
        N.nsid(*args, [pb["full"]], fixed_point=pb["comp"], mean_batch=pb["full"], steps=0)
    with pytest.raises(ValueError, match="NaN"):
        N.nsid(pb["outer"], pb["w"], torch.tensor([math.nan, 0.0]), [pb["full"]], **kw)
    bad = N.proximal_gradient_composite(
        pb["batch_loss"], lambda u, th, e: P.soft_threshold(u, e * th[0]), 1 / pb["L"])
    with pytest.raises(ValueError, match=">= 0"):  # a negative strength reaches the prox
        N.nsid(pb["outer"], pb["w"], torch.tensor([-1.0, 0.0]), [pb["full"]], fixed_point=bad,
               mean_batch=pb["full"], steps=5)
    # a step that breaks the contraction: the default schedule refuses it
    too_big = N.proximal_gradient_composite(pb["batch_loss"], pb["prox"], 3 / pb["L"])
    with pytest.raises(ValueError, match="contraction"):
        N.nsid(*args, [pb["full"]], fixed_point=too_big, mean_batch=pb["full"], steps=5)
    # ... and the stochastic inner solver reports divergence instead of returning garbage
    spg = dict(batch_loss=pb["batch_loss"], prox=pb["prox"])
    with pytest.raises(bilevel.NotContractionError, match="step"):
        N.stochastic_proximal_gradient(torch.ones(5), pb["theta"], _random_batches(pb["n"], 10, 0),
                                       steps=3000, step_size=5 / pb["L"], **spg)
    with pytest.raises(ValueError, match="step_size"):
        N.stochastic_proximal_gradient(torch.ones(5), pb["theta"], [pb["full"]], steps=3, step_size=-1.0,
                                       **spg)


def test_elastic_net_job_quick_and_resume(tmp_path, capsys):
    import json

    from bilevel import cli
    from bilevel.apps import elastic_net as job

    out = tmp_path / "en"
    assert cli.main(["run", "elastic-net", "--quick", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "elastic_net.png").stat().st_size > 0
    for key in ("two_strengths", "per_group"):
        r = res[key]
        assert len(r["history"]["val_mse"]) == job.QUICK["steps"] and r["test_mse"] > 0
        assert all(a > 0 for a in r["alpha_l1"]) and r["alpha_l2"] > 0
    assert len(res["per_group"]["alpha_l1"]) == len(res["per_group"]["groups"])
    assert res["enet_cv"]["test_mse"] > 0 and res["enet_cv"]["seconds"] > 0
    nv = res["nsid_vs_aid"]
    assert [r["t"] for r in nv["aid"]] == list(job.QUICK["aid_budgets"])
    assert [r["t"] for r in nv["nsid"]] == list(job.QUICK["nsid_budgets"])
    assert nv["aid"][-1]["rel_err"] < nv["aid"][0]["rel_err"] and nv["nsid"][-1]["rel_err"] < 0.5
    assert nv["nsid"][0]["samples"] == 2 * nv["nsid"][0]["t"] * nv["batch"] + nv["n"]
    assert "verdict" in capsys.readouterr().out
    # --resume: everything is in the checkpoint, the same numbers come back
    assert job.main(["--quick", "--out", str(out), "--no-progress", "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["nsid_vs_aid"] == nv and again["per_group"]["alpha_l1"] == res["per_group"]["alpha_l1"]
    with pytest.raises(ValueError, match="other settings"):
        job.main(["--quick", "--seed", "1", "--out", str(out), "--no-progress", "--resume"])

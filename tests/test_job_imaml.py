"""The imaml job: --quick runs end to end (sinusoids; digits episodes), its three
meta-gradients against exact ones (float64) for both losses, and kill-and-resume giving the
numbers of an uninterrupted run."""

import json
import math

import pytest
import torch
from torch.func import grad

import bilevel
from bilevel.apps import _runs
from bilevel.apps import imaml as J

F64 = torch.float64


def _quick(tmp_path, *extra):
    return J.main(["--quick", "--no-progress", "--out", str(tmp_path), *extra])


def _check_common(res):
    assert set(res) >= {"config", "test", "sweep", "history", "scales", "timings"}
    assert set(res["test"]) == {"iMAML", "MAML", "FOMAML", "random init"}
    assert {(r["method"], r["inner_steps"]) for r in res["sweep"]} == {
        (m, T) for m in J.METHODS for T in J.QUICK["sweep_steps"]}
    for r in res["sweep"]:
        assert r["ms_per_meta_step"] > 0
        assert r["peak_mib"] is None or r["peak_mib"] >= 0
    for m in J.METHODS:
        h = res["history"][m]["query_loss"]
        assert len(h) == J.QUICK["meta_steps"] and all(math.isfinite(v) for v in h)
    assert all(0 <= v < math.inf for v in res["imaml_inner_residual"].values())


def test_quick_run_end_to_end(tmp_path, one_thread):
    assert _quick(tmp_path) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    _check_common(res)
    assert res["config"]["task"] == "sinusoid" and "data" not in res
    for r in res["test"].values():
        assert math.isfinite(r["mse"]) and r["mse"] > 0 and r["tasks"] == J.QUICK["test_tasks"]
    assert (tmp_path / "imaml.png").stat().st_size > 1000


def test_quick_digits_episodes_end_to_end(tmp_path, one_thread):
    assert _quick(tmp_path, "--task", "digits") == 0
    res = json.loads((tmp_path / "results.json").read_text())
    _check_common(res)
    cfg = res["config"]
    assert cfg["task"] == "digits" and cfg["shots"] == J.IMAGE_DEFAULTS["shots"] and cfg["hidden"] == J.QUICK["hidden"]
    assert res["data"]["meta_train_classes"] == res["data"]["meta_test_classes"] == 5
    assert set(res["test_at_start"]) == set(J.METHODS)
    for per_shot in [*res["test"].values(), *res["test_at_start"].values()]:
        assert set(per_shot) == {"1", "5"}
        for r in per_shot.values():
            assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["ci95"]) and r["episodes"] == J.QUICK["test_tasks"]
    assert (tmp_path / "imaml.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- exact meta-gradients


def _tiny(kind, seed=0, smooth=False):
    """(model, θ, a meta-batch, loss) in float64: a sinusoid MLP 1-6-6-1 on 2 tasks, or a
    digits MLP 64-4-4-5 on 2 real 5-way 2-shot episodes of the meta-train classes."""
    if kind == "sinusoid":
        model = J.make_model(6, seed, F64)
        tasks = J.sample_tasks(torch.Generator().manual_seed(seed), 2, 5, 5, F64)
    else:
        cfg = J.Config(**{**J.QUICK, **J.IMAGE_DEFAULTS, "task": "digits", "seed": seed, "meta_batch": 2,
                          "shots": 2, "queries": 3, "hidden": 4})
        pools = J.check_tasks(cfg)
        model = J.model_of(cfg, seed, pools).to(F64)
        eps = J.tasks_at(cfg, 0, pools=pools)
        tasks = J.Episodes(eps.xs.to(F64), eps.ys, eps.xq.to(F64), eps.yq)
    if smooth:  # tanh: the inner problem has a smooth minimiser (ReLU's can sit on a kink)
        model = torch.nn.Sequential(*(torch.nn.Tanh() if isinstance(m, torch.nn.ReLU) else m for m in model))
    return model, bilevel.nn.tensors(model), tasks, J.mse if kind == "sinusoid" else J.cross_entropy


def _flat(d):
    return torch.cat([d[k].reshape(-1) for k in sorted(d)])


@pytest.mark.parametrize("kind", ["sinusoid", "digits"])
def test_imaml_meta_gradient_equals_a_dense_hessian_solve(kind, one_thread):
    # inner problem solved to convergence (many proximal GD steps), MINRES to convergence:
    # the job's iMAML meta-gradient equals mean_i λ (∇²L_i^s + λI)⁻¹ ∇L_i^q (dense, float64);
    # digits: cross-entropy on real episodes.  tanh, not ReLU: with ReLU the proximal GD
    # iterates of these episodes stall on a kink (gradient norm 1e-2 after 2000 steps), where
    # no Hessian exists, so the "exact" answer would not be one
    model, theta, tasks, loss = _tiny(kind, smooth=True)
    lam, lr, steps = (5.0, 0.02, 1000) if kind == "sinusoid" else (1.0, 0.3, 300)
    got, _ = J.imaml_grad(model, theta, tasks, steps, lr, lam, bilevel.MINRES(maxiter=400, tol=1e-12), loss)
    names = sorted(theta)
    shapes = [theta[k].shape for k in names]

    def unflat(v):
        out, o = {}, 0
        for k, s in zip(names, shapes):
            out[k] = v[o:o + s.numel()].reshape(s)
            o += s.numel()
        return out

    exact = []
    for x, y, xq, yq in zip(*tasks):
        w = J.adapt(model, theta, x, y, steps, lr, lam, loss)
        gw = grad(lambda w, x=x, y=y: loss(model, w, x, y) + lam * J.proximal(w, theta))(w)
        assert _flat(gw).norm() < 1e-7  # the inner problem is solved
        H = torch.func.hessian(lambda v, x=x, y=y: loss(model, unflat(v), x, y))(_flat(w))
        assert float(torch.linalg.eigvalsh(H).min()) > -lam  # ∇²L^s + λI is invertible, w a minimiser
        b = _flat(grad(lambda w, xq=xq, yq=yq: loss(model, w, xq, yq))(w))
        exact.append(lam * torch.linalg.solve(H + lam * torch.eye(len(b), dtype=F64), b))
    exact = torch.stack(exact).mean(0)
    assert float((_flat(got) - exact).norm() / exact.norm()) < 1e-6
    assert float(J.inner_residual(model, theta, tasks, steps, lr, lam, loss).max()) < 1e-6  # and the job's check


def _gd(model, th, x, y, steps, lr, loss):
    return J.adapt(model, th, x, y, steps, lr, loss=loss)


@pytest.mark.parametrize("kind", ["sinusoid", "digits"])
def test_maml_and_fomaml_meta_gradients_equal_autograd_through_the_loop(kind, one_thread):
    model, theta, tasks, loss = _tiny(kind, seed=1)
    lr, steps = (0.05, 4) if kind == "sinusoid" else (0.4, 4)
    got, _ = J.maml_grad(model, theta, tasks, steps, lr, loss)
    fo, _ = J.fomaml_grad(model, theta, tasks, steps, lr, loss)
    th = {k: t.clone().requires_grad_() for k, t in theta.items()}
    total, fo_ref = 0.0, {k: torch.zeros_like(t) for k, t in theta.items()}
    for x, y, xq, yq in zip(*tasks):
        w = dict(th)
        for _ in range(steps):  # plain autograd, graph kept: the MAML reference
            g = torch.autograd.grad(loss(model, w, x, y), list(w.values()), create_graph=True)
            w = {k: w[k] - lr * gk for k, gk in zip(w, g)}
        total = total + loss(model, w, xq, yq) / 2
        wd = {k: t.detach().requires_grad_() for k, t in w.items()}
        for k, gk in zip(wd, torch.autograd.grad(loss(model, wd, xq, yq), list(wd.values()))):
            fo_ref[k] += gk / 2
    ref = dict(zip(th, torch.autograd.grad(total, list(th.values()))))
    assert float((_flat(got) - _flat(ref)).norm() / _flat(ref).norm()) < 1e-12
    assert float((_flat(fo) - _flat(fo_ref)).norm() / _flat(fo_ref).norm()) < 1e-12
    # and a central finite difference of the MAML meta-loss along a direction
    d = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(2), dtype=F64) for k, t in theta.items()}

    def meta_loss(th):
        return torch.stack([loss(model, _gd(model, th, x, y, steps, lr, loss), xq, yq)
                            for x, y, xq, yq in zip(*tasks)]).mean()

    eps = 1e-6
    plus, minus = ({k: theta[k] + sign * eps * d[k] for k in d} for sign in (1, -1))
    fd = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
    assert abs(float(_flat(got) @ _flat(d)) - float(fd)) < 1e-7 * max(1.0, abs(float(fd)))


# ----------------------------------------------------------------------------- resume, user errors


@pytest.mark.parametrize("task", ["digits"])  # the loop is the sinusoids' too; only the sampler differs
def test_kill_and_resume_gives_the_uninterrupted_numbers(tmp_path, killed_at, one_thread, task):
    full = tmp_path / "full"
    assert _quick(full, "--task", task) == 0
    want = json.loads((full / "results.json").read_text())

    part = tmp_path / "part"
    revive = killed_at(J, "meta_step", 3 * 3 + 2)  # the second method of the fourth meta-step
    with pytest.raises(KeyboardInterrupt):
        _quick(part, "--task", task)
    revive()
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 3
    assert _quick(part, "--task", task, "--resume") == 0
    got = json.loads((part / "results.json").read_text())
    assert got["test"] == want["test"]
    for m in J.METHODS:
        assert got["history"][m]["query_loss"] == want["history"][m]["query_loss"]


def test_unknown_solver_is_one_line_before_compute(tmp_path):
    cfg = J.Config(**{**J.QUICK, "seed": 0, "solver": "lu"})
    with pytest.raises(_runs.UserError, match="--solver 'lu' is not known"):
        J.solver(cfg)


def test_missing_fashion_mnist_is_one_line_naming_this_jobs_option(tmp_path):
    cfg = J.Config(**{**J.QUICK, **J.IMAGE_DEFAULTS, "task": "fashion-mnist", "data_dir": str(tmp_path)})
    with pytest.raises(_runs.UserError, match="no fashion-mnist IDX files found .* or use --task digits"):
        J.check_tasks(cfg)


def test_bad_task_or_lam_is_one_line_before_compute():
    with pytest.raises(_runs.UserError, match="invalid choice: 'mnist'"):
        J.config_from_args(J._parser().parse_args(["--task", "mnist"]))
    with pytest.raises(_runs.UserError, match="--lam should be > 0"):
        J.config_from_args(J._parser().parse_args(["--task", "digits", "--lam", "0"]))
    with pytest.raises(_runs.UserError, match="--task 'omniglot' is not known"):
        J.check_config(J.Config(task="omniglot"))

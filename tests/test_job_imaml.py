"""The imaml job: a --quick run end to end, its three meta-gradients against exact ones
(float64), and kill-and-resume giving the numbers of an uninterrupted run."""

import json
import math

import pytest
import torch
from torch.func import grad

import bilevel
from bilevel.apps import imaml as J

F64 = torch.float64


def _quick(tmp_path, *extra):
    return J.main(["--quick", "--no-progress", "--out", str(tmp_path), *extra])


def test_quick_run_end_to_end(tmp_path, one_thread):
    assert _quick(tmp_path) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res) >= {"config", "test", "sweep", "history", "scales", "timings"}
    assert set(res["test"]) == {"iMAML", "MAML", "FOMAML", "random init"}
    for r in res["test"].values():
        assert math.isfinite(r["mse"]) and r["mse"] > 0 and r["tasks"] == J.QUICK["test_tasks"]
    assert {(r["method"], r["inner_steps"]) for r in res["sweep"]} == {
        (m, T) for m in J.METHODS for T in J.QUICK["sweep_steps"]}
    for r in res["sweep"]:
        assert r["ms_per_meta_step"] > 0
        assert r["peak_mib"] is None or r["peak_mib"] >= 0
    for m in J.METHODS:
        assert len(res["history"][m]["query_mse"]) == J.QUICK["meta_steps"]
    assert (tmp_path / "imaml.png").stat().st_size > 1000


def _tiny(seed=0, smooth=False):
    model = J.make_model(6, seed, F64)
    if smooth:  # tanh: the inner problem has a smooth minimiser (ReLU's can sit on a kink)
        model = torch.nn.Sequential(*(torch.nn.Tanh() if isinstance(m, torch.nn.ReLU) else m for m in model))
    gen = torch.Generator().manual_seed(seed)
    return model, bilevel.nn.tensors(model), J.sample_tasks(gen, 2, 5, 5, F64)


def _flat(d):
    return torch.cat([d[k].reshape(-1) for k in sorted(d)])


def test_imaml_meta_gradient_equals_a_dense_hessian_solve():
    # inner problem solved to convergence (many proximal GD steps), MINRES to convergence:
    # the job's iMAML meta-gradient equals mean_i λ (∇²L_i^s + λI)⁻¹ ∇L_i^q (dense, float64)
    model, theta, tasks = _tiny(smooth=True)
    lam, lr, steps = 5.0, 0.02, 1000
    got, _ = J.imaml_grad(model, theta, tasks, steps, lr, lam, bilevel.MINRES(maxiter=200, tol=1e-12))
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
        w = J.adapt(model, theta, x, y, steps, lr, lam)
        gw = grad(lambda w, x=x, y=y: J.mse(model, w, x, y) + lam * J.proximal(w, theta))(w)
        assert _flat(gw).norm() < 1e-7  # the inner problem is solved
        H = torch.func.hessian(lambda v, x=x, y=y: J.mse(model, unflat(v), x, y))(_flat(w))
        b = _flat(grad(lambda w, xq=xq, yq=yq: J.mse(model, w, xq, yq))(w))
        exact.append(lam * torch.linalg.solve(H + lam * torch.eye(len(b), dtype=F64), b))
    exact = torch.stack(exact).mean(0)
    assert float((_flat(got) - exact).norm() / exact.norm()) < 1e-6


def test_maml_and_fomaml_meta_gradients_equal_autograd_through_the_loop():
    model, theta, tasks = _tiny(1)
    lr, steps = 0.05, 4
    got, _ = J.maml_grad(model, theta, tasks, steps, lr)
    fo, _ = J.fomaml_grad(model, theta, tasks, steps, lr)
    th = {k: t.clone().requires_grad_() for k, t in theta.items()}
    total, fo_ref = 0.0, {k: torch.zeros_like(t) for k, t in theta.items()}
    for x, y, xq, yq in zip(*tasks):
        w = dict(th)
        for _ in range(steps):  # plain autograd, graph kept: the MAML reference
            g = torch.autograd.grad(J.mse(model, w, x, y), list(w.values()), create_graph=True)
            w = {k: w[k] - lr * gk for k, gk in zip(w, g)}
        total = total + J.mse(model, w, xq, yq) / 2
        wd = {k: t.detach().requires_grad_() for k, t in w.items()}
        for k, gk in zip(wd, torch.autograd.grad(J.mse(model, wd, xq, yq), list(wd.values()))):
            fo_ref[k] += gk / 2
    ref = dict(zip(th, torch.autograd.grad(total, list(th.values()))))
    assert float((_flat(got) - _flat(ref)).norm() / _flat(ref).norm()) < 1e-12
    assert float((_flat(fo) - _flat(fo_ref)).norm() / _flat(fo_ref).norm()) < 1e-12
    # and a central finite difference of the MAML meta-loss along a direction
    d = {k: torch.randn_like(t) for k, t in theta.items()}

    def meta_loss(th):
        return torch.stack([J.mse(model, _gd(model, th, x, y, steps, lr), xq, yq)
                            for x, y, xq, yq in zip(*tasks)]).mean()

    eps = 1e-6
    plus, minus = ({k: theta[k] + sign * eps * d[k] for k in d} for sign in (1, -1))
    fd = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
    assert abs(float(_flat(got) @ _flat(d)) - float(fd)) < 1e-7 * max(1.0, abs(float(fd)))


def _gd(model, th, x, y, steps, lr):
    return J.adapt(model, th, x, y, steps, lr)


def test_kill_and_resume_gives_the_uninterrupted_numbers(tmp_path, killed_at, one_thread):
    full = tmp_path / "full"
    assert _quick(full) == 0
    want = json.loads((full / "results.json").read_text())

    part = tmp_path / "part"
    revive = killed_at(J, "meta_step", 3 * 3 + 2)  # the second method of the fourth meta-step
    with pytest.raises(KeyboardInterrupt):
        _quick(part)
    revive()
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 3
    assert _quick(part, "--resume") == 0
    got = json.loads((part / "results.json").read_text())
    assert got["test"] == want["test"]
    for m in J.METHODS:
        assert got["history"][m]["query_mse"] == want["history"][m]["query_mse"]


def test_unknown_solver_is_one_line_before_compute(tmp_path):
    cfg = J.Config(**{**J.QUICK, "seed": 0, "solver": "lu"})
    with pytest.raises(bilevel.apps._runs.UserError, match="--solver 'lu' is not known"):
        J.solver(cfg)

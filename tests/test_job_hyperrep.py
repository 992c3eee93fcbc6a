"""The hyperrep job: --quick runs (digits MLP; Omniglot CNN with BatchNorm on a tiny synthetic
folder in torchvision's layout), its meta-gradients against exact ones (float64), and
kill-and-resume giving the numbers of an uninterrupted run."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import bilevel
from bilevel.apps import _runs
from bilevel.apps import hyperrep as J

F64 = torch.float64


def _quick(out, *extra):
    return J.main(["--quick", "--no-progress", "--out", str(out), *map(str, extra)])


def _check_results(out, dataset):
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"config", "data", "test", "learned", "history", "scales", "timings"}
    assert res["data"]["dataset"] == dataset
    assert set(res["test"]) == {"hyper-representation", "pretrained + head", "random features + head"}
    for per_shot in res["test"].values():
        assert set(per_shot) == {"1", "5"}
        for r in per_shot.values():
            assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["ci95"]) and r["episodes"] == J.QUICK["test_episodes"]
    assert len(res["history"]["outer_loss"]) == J.QUICK["meta_steps"]
    assert all(math.isfinite(v) for v in res["history"]["outer_loss"])
    assert (out / "hyperrep.png").stat().st_size > 1000
    return res


def test_quick_digits_ridge_end_to_end(tmp_path, one_thread):
    assert _quick(tmp_path) == 0
    res = _check_results(tmp_path, "digits")
    assert res["data"]["meta_train_classes"] == 5 and res["data"]["meta_test_classes"] == 5


def _omniglot(root, characters=10, per_char=8, side=105):
    """A tiny folder in torchvision's Omniglot layout: images_background/<alphabet>/<character>/*.png."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(characters):
        folder = root / "images_background" / f"Alphabet_{c % 3}" / f"character{c:02d}"
        folder.mkdir(parents=True)
        stroke = torch.rand(side, side, generator=g) > 0.9  # each character: its own stroke pattern
        for i in range(per_char):
            noise = torch.rand(side, side, generator=g) > 0.98
            img = torch.where(stroke ^ noise, 0, 255).to(torch.uint8)  # black strokes on white
            Image.fromarray(img.numpy(), mode="L").save(folder / f"{c:02d}_{i:02d}.png")


def test_quick_omniglot_cnn_with_batchnorm_on_a_synthetic_folder(tmp_path, one_thread):
    _omniglot(tmp_path / "omni")
    out = tmp_path / "out"
    assert _quick(out, "--dataset", "omniglot", "--data-dir", tmp_path / "omni") == 0
    res = _check_results(out, "omniglot")
    assert res["data"]["shape"] == [28, 28] and res["data"]["meta_train_classes"] == 5
    pools = J.load_data(J.Config(**{**J.QUICK, "dataset": "omniglot", "data_dir": str(tmp_path / "omni")}))
    assert pools.X_train.shape == (40, 1, 28, 28) and 0 <= float(pools.X_train.min()) <= float(pools.X_train.max()) <= 1


def test_omniglot_without_a_folder_is_one_line(tmp_path):
    with pytest.raises(_runs.UserError, match="needs --data-dir"):
        J.load_omniglot(None)
    with pytest.raises(_runs.UserError, match="no Omniglot characters"):
        J.load_omniglot(tmp_path)


def _tiny(head, method="aid", seed=0):
    cfg = J.Config(**{**J.QUICK, "head": head, "method": method, "seed": seed})
    pools = J.load_data(cfg)
    learner = J.make_learner(cfg, pools.shape, seed).to(F64)
    gen = torch.Generator().manual_seed(seed)
    eps = J.sample_episodes(gen, pools.X_train, pools.y_train, 2, cfg.ways, cfg.train_shots, cfg.queries)
    return cfg, learner, J.Episodes(*(t.to(F64) if t.is_floating_point() else t for t in eps))


def _flat(d, names):
    return torch.cat([d[k].reshape(-1) for k in names])


def test_ridge_head_meta_gradient_equals_aid_on_the_ridge_problem():
    # differentiating through the closed form = the implicit function theorem on the ridge
    # inner problem, solved exactly (float64)
    cfg, learner, eps = _tiny("ridge")
    lam = bilevel.nn.tensors(learner)
    got, _, _ = J.meta_gradient(learner, cfg, eps)
    total = {k: torch.zeros_like(t) for k, t in lam.items()}
    for xs, ys, xq, yq in zip(*eps):
        def inner(W, hp, xs=xs, ys=ys, xq=xq):
            zs, _ = J.embed(learner, hp, xs, xq)
            fit = 0.5 * ((zs @ W - F.one_hot(ys, cfg.ways).to(F64)) ** 2).sum()
            return fit + 0.5 * hp["log_ridge"].exp() * (W**2).sum()

        def outer(W, hp, xs=xs, xq=xq, yq=yq):
            _, zq = J.embed(learner, hp, xs, xq)
            return F.cross_entropy(hp["log_scale"].exp() * (zq @ W), yq)

        zs, _ = J.embed(learner, lam, xs, xq)
        W = J.ridge_head(zs, ys, cfg.ways, lam["log_ridge"].exp())
        hg = bilevel.hypergrad(outer, W, lam, inner_loss=inner, solver=bilevel.CG(maxiter=200, tol=1e-13))
        for k in total:
            total[k] += hg[k] / len(eps.xs)
    names = sorted(lam)
    a, b = _flat(got, names), _flat(total, names)
    assert float((a - b).norm() / b.norm()) < 1e-8


@pytest.mark.parametrize("method", ["aid", "itd"])
def test_logistic_head_meta_gradient_against_finite_differences(method):
    cfg, learner, eps = _tiny("logistic", method)
    cfg = dataclasses.replace(cfg, inner_steps=400, cg_iters=200)
    lam = bilevel.nn.tensors(learner)
    got, _, _ = J.meta_gradient(learner, cfg, eps)

    def F_of(hp):  # the outer loss with the head solved by the same 400 steps
        eta = J.logistic_step(hp["log_ridge"].exp())
        losses = []
        for xs, ys, xq, yq in zip(*eps):
            zs, zq = J.embed(learner, hp, xs, xq)
            W = J.logistic_fit(zs, ys, cfg.ways, hp["log_ridge"].exp(), cfg.inner_steps, eta)
            losses.append(F.cross_entropy(zq @ W, yq))
        return torch.stack(losses).mean()

    # exact: autograd through the 400 converged steps (the inner map is a contraction with
    # rate ρη = 2/3: w_T is the solution to rounding, its derivative the implicit one)
    ref = torch.func.grad(F_of)(lam)
    names = sorted(k for k in lam if k != "log_ridge")  # the GD step depends on ρ: ITD sees that, AID not
    a, b = _flat(got, names), _flat(ref, names)
    # AID: as accurate as its CG (relative residual 1e-6); ITD: the same computation
    assert float((a - b).norm() / b.norm()) < (1e-5 if method == "aid" else 1e-10)
    # and a central finite difference along a direction (ReLU kinks: a loose tolerance)
    g = torch.Generator().manual_seed(1)
    d = {k: torch.randn(t.shape, generator=g, dtype=F64) for k, t in lam.items()}
    d["log_ridge"] = torch.zeros((), dtype=F64)
    h = 1e-6
    plus, minus = ({k: lam[k] + s * h * d[k] for k in lam} for s in (1, -1))
    fd = float((F_of(plus) - F_of(minus)) / (2 * h))
    dot = sum(float((got[k] * d[k]).sum()) for k in lam)
    assert abs(dot - fd) <= 1e-3 * abs(fd), (dot, fd)


def test_kill_and_resume_gives_the_uninterrupted_numbers(tmp_path, killed_at, one_thread):
    full = tmp_path / "full"
    assert _quick(full) == 0
    want = json.loads((full / "results.json").read_text())

    part = tmp_path / "part"
    revive = killed_at(J, "meta_gradient", 3)
    with pytest.raises(KeyboardInterrupt):
        _quick(part)
    revive()
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 2
    assert _quick(part, "--resume") == 0
    got = json.loads((part / "results.json").read_text())
    assert got["test"] == want["test"] and got["learned"] == want["learned"]
    for k in ("outer_loss", "query_acc", "log_ridge", "log_scale"):
        assert got["history"][k] == want["history"][k]


def test_bad_head_is_one_line_before_compute():
    with pytest.raises(_runs.UserError, match="--head 'svm' is not known"):
        J.config_from_args(J._parser().parse_args(["--head", "svm"]))

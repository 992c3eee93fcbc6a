"""SID (stochastic implicit differentiation) against exact hypergradients, and its misuse.

The ridge and logistic problems of ``problems.py`` are finite sums over n samples; a batch
of rows gives an unbiased estimate of the inner map, so SID must approach the exact
hypergradient as the batch grows and as the (decreasing-step) iterations go on.  With the
full data as the only batch and constant step 1, SID *is* deterministic AID-FP and must
match the exact answer to machine precision.
"""

import itertools

import pytest
import torch
from problems import _data, logistic, rel_err, ridge

import bilevel as bl

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


class RandomBatches:
    """Endless batches of ``size`` random rows (with replacement), seeded; re-iterable."""

    def __init__(self, tensors, size, seed):
        self.tensors, self.size, self.seed = tensors, size, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        n = len(self.tensors[0])
        while True:
            idx = torch.randint(n, (self.size,), generator=g)
            yield [t[idx] for t in self.tensors]


def ridge_batched():
    """problems.ridge with Φ̂(w, λ, (X_B, y_B)) = w − η ∇ĝ_B: the same exact hypergradient."""
    p = ridge()
    X, y, _ = _data(40, 8, 0)
    Xv, yv, _ = _data(40, 8, 100)
    w, lam = p.params, p.hparams
    assert torch.allclose(p.inner_loss(w, lam), 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum())
    eta = 1.0 / torch.linalg.eigvalsh(X.T @ X / 40 + torch.diag(lam.exp())).max().item()

    def fixed_point(w, lam, batch):
        Xb, yb = batch
        return w - eta * (Xb.T @ (Xb @ w - yb) / len(yb) + lam.exp() * w)

    def outer_loss(w, lam, batch):
        Xb, yb = batch
        return 0.5 * ((Xb @ w - yb) ** 2).mean()

    return p, (X, y), (Xv, yv), fixed_point, outer_loss


def logistic_batched():
    """problems.logistic rebuilt from its seed, as an inner_loss on batches."""
    p = logistic()
    X, _, g = _data(60, 6, 1)
    y = torch.sign(X @ torch.randn(6, generator=g, dtype=DT) + 0.3 * torch.randn(60, generator=g, dtype=DT))
    Xv, _, _ = _data(60, 6, 101)
    yv = torch.sign(Xv[:, 0] + 0.1)

    def data_loss(w, X, y):
        return torch.nn.functional.softplus(-y * (X @ w)).mean()

    def inner_loss(w, lam, batch):
        return data_loss(w, *batch) + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(w, lam, batch):
        return data_loss(w, *batch)

    assert torch.allclose(inner_loss(p.params, p.hparams, (X, y)), p.inner_loss(p.params, p.hparams))
    assert torch.allclose(outer_loss(p.params, p.hparams, (Xv, yv)), p.outer_loss(p.params, p.hparams))
    return p, (X, y), (Xv, yv), inner_loss, outer_loss


def test_full_batch_sid_is_exact():
    p, train, val, fp, fo = ridge_batched()
    hg, info = bl.sid(fo, torch.zeros(8, dtype=DT), p.hparams, [train], fixed_point=fp, outer_batches=[val],
                      inner_steps=100, linear_steps=100, return_info=True)
    assert rel_err(hg, p.exact) < 1e-10
    assert info.inner_residual < 1e-12 and info.linear_residual < 1e-12
    assert info.samples == 40 * (100 + 2 * 100 + 2)
    assert torch.allclose(info.params, p.params, atol=1e-12)

    p, train, val, g, fo = logistic_batched()
    H = torch.func.hessian(p.inner_loss)(p.params, p.hparams)
    eta = 1.0 / torch.linalg.eigvalsh(H).max().item()
    hg = bl.sid(fo, torch.zeros(6, dtype=DT), p.hparams, [train], inner_loss=g, outer_batches=[val],
                inner_steps=150, linear_steps=150, inner_step_size=eta, linear_step_size=eta)
    assert rel_err(hg, p.exact) < 1e-8


def _mse(p, train, val, fp, fo, size, steps, seeds=4, step=None, form="fixed_point"):
    step = step or bl.DecreasingStep(3.0, 3.0)
    ests = []
    for s in range(seeds):
        ests.append(bl.sid(
            fo, torch.zeros_like(p.params), p.hparams, RandomBatches(train, size, 2 * s), **{form: fp},
            outer_batches=RandomBatches(val, size, 2 * s + 1), inner_steps=steps, linear_steps=steps,
            hparam_batches=4, inner_step_size=step, linear_step_size=step,
        ))
    E = torch.stack(ests)
    mse = ((E - p.exact) ** 2).sum(1).mean().item() / p.exact.norm().item() ** 2
    bias = (E.mean(0) - p.exact).norm().item() / p.exact.norm().item()
    return mse, bias


def test_ridge_mse_decreases_with_batch_size():
    p, train, val, fp, fo = ridge_batched()
    res = {b: _mse(p, train, val, fp, fo, b, 60, seeds=5) for b in (2, 16, 128)}
    mses = [res[b][0] for b in (2, 16, 128)]
    # relative MSE, O(1/batch): each 8x batch cuts it by > 3x.  Here ∇F comes entirely
    # from the (∂_λΦ)ᵀv term: a wrong sign or a missing term has a relative error >= 1,
    # so an MSE < 0.01 and a mean over seeds within 6% cannot come from a biased estimator
    assert mses[1] < mses[0] / 3 and mses[2] < mses[1] / 3, res
    assert mses[2] < 0.01, res
    assert res[128][1] < 0.06, res


def test_ridge_mse_decreases_with_steps():
    p, train, val, fp, fo = ridge_batched()
    res = {t: _mse(p, train, val, fp, fo, 4, t, seeds=4, step=bl.DecreasingStep(5.0, 5.0)) for t in (20, 320)}
    # decreasing steps β/(γ + t): the mean squared error goes down like O(1/t) (AISTATS
    # 2021); 16x the steps, > 5x less error
    assert res[320][0] < res[20][0] / 5, res
    assert res[320][0] < 0.05 and res[320][1] < 0.15, res


def test_logistic_sgd_form_mse_decreases_with_batch_size():
    p, train, val, g, fo = logistic_batched()
    H = torch.func.hessian(p.inner_loss)(p.params, p.hparams)
    eta = 1.0 / torch.linalg.eigvalsh(H).max().item()
    step = bl.DecreasingStep(3 * eta, 3.0)  # SGD steps 3η/(3 + t) on ĝ, η = 1/L
    res = {b: _mse(p, train, val, g, fo, b, 60, step=step, form="inner_loss") for b in (2, 128)}
    assert res[128][0] < res[2][0] / 10, res
    assert res[128][0] < 0.02 and res[128][1] < 0.08, res


def test_stochastic_fixed_point_approaches_the_solution():
    p, train, _, fp, _ = ridge_batched()
    errs = []
    for steps in (30, 300):
        w = [bl.stochastic_fixed_point(torch.zeros(8, dtype=DT), p.hparams, RandomBatches(train, 4, s),
                                       fixed_point=fp, steps=steps, step_size=bl.DecreasingStep(10.0, 10.0))
             for s in range(4)]
        errs.append(sum(((wi - p.params) ** 2).sum().item() for wi in w) / 4)
    assert errs[1] < errs[0] / 4, errs
    full = bl.stochastic_fixed_point(torch.zeros(8, dtype=DT), p.hparams, [train], fixed_point=fp, steps=800)
    assert torch.allclose(full, p.params, atol=1e-12)


LINEAR = 150


def test_data_loader_pytree_params_and_nn_module():
    """A DataLoader of (X, y) as is; params a dict of an nn.Module through functional_call."""
    torch.manual_seed(0)
    X, y = torch.randn(32, 3, dtype=DT), torch.randn(32, 1, dtype=DT)
    Xv, yv = torch.randn(20, 3, dtype=DT), torch.randn(20, 1, dtype=DT)
    model = torch.nn.Linear(3, 1).double()
    params0 = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    hparams = {"weight": torch.full((1, 3), -1.0, dtype=DT), "bias": torch.tensor([-2.0], dtype=DT)}

    one = torch.tensor(1.0, dtype=DT, requires_grad=True)  # a captured leaf: no graph may grow on it

    def inner_loss(params, lam, batch):
        xb, yb = batch
        pred = torch.func.functional_call(model, params, (xb,))
        return 0.5 * one * ((pred - yb) ** 2).mean() + 0.5 * sum((lam[k].exp() * params[k] ** 2).sum() for k in params)

    def outer_loss(params, lam, batch):
        return 0.5 * ((torch.func.functional_call(model, params, (Xv,)) - yv) ** 2).mean()

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32)
    hg, info = bl.sid(outer_loss, params0, hparams, loader, inner_loss=inner_loss, outer_batches=[None],
                      inner_steps=20, linear_steps=LINEAR, inner_step_size=0.5, linear_step_size=0.5,
                      return_info=True)
    # the same w: AID with a dense solve is what the linear iterations converge to
    exact = bl.hypergrad(lambda p, h: outer_loss(p, h, None), info.params, hparams,
                         inner_loss=lambda p, h: inner_loss(p, h, (X, y)), solver=bl.Dense())
    assert set(hg) == {"weight", "bias"} and hg["weight"].shape == (1, 3)
    assert rel_err(hg, exact) < 1e-8
    assert not hg["bias"].requires_grad and not info.params["weight"].requires_grad and not info.v["bias"].requires_grad


def test_iterables_reiterate_and_streams_continue():
    p, train, val, fp, fo = ridge_batched()
    halves = [[t[:20] for t in train], [t[20:] for t in train]]
    stream = bl.BatchStream(halves)  # a list: re-iterated, one epoch per 2 batches
    bl.stochastic_fixed_point(torch.zeros(8, dtype=DT), p.hparams, stream, fixed_point=fp, steps=7)
    assert (stream.batches, stream.epochs, stream.samples) == (7, 3, 140)
    bl.stochastic_fixed_point(torch.zeros(8, dtype=DT), p.hparams, stream, fixed_point=fp, steps=2)
    assert (stream.batches, stream.epochs) == (9, 4)  # went on where it stopped
    # an endless one-shot iterator is fine; a None batch counts no samples
    _, info = bl.sid(fo, torch.zeros(8, dtype=DT), p.hparams, itertools.cycle(halves), fixed_point=fp,
                     outer_batches=itertools.repeat(val), inner_steps=3, linear_steps=2, return_info=True)
    assert info.samples == 20 * 3 + (20 + 40) * 3


def test_empty_or_exhausted_data():
    p, train, val, fp, fo = ridge_batched()
    w0 = torch.zeros(8, dtype=DT)
    for empty in ([], iter([]), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train[0][:0]))):
        with pytest.raises(bl.DataExhaustedError, match="no batch"):
            bl.stochastic_fixed_point(w0, p.hparams, empty, fixed_point=fp, steps=1)
    one_shot = (train for _ in range(3))  # a generator cannot be restarted
    with pytest.raises(bl.DataExhaustedError, match="ran out after 3 batches"):
        bl.sid(fo, w0, p.hparams, one_shot, fixed_point=fp, outer_batches=[val], inner_steps=2, linear_steps=2)
    assert issubclass(bl.DataExhaustedError, ValueError)
    with pytest.raises(TypeError, match="iterable of batches"):
        bl.sid(fo, w0, p.hparams, 3, fixed_point=fp)


def test_batches_that_disagree_with_params():
    p, train, val, fp, fo = ridge_batched()
    w0 = torch.zeros(8, dtype=DT)
    wide = [torch.randn(10, 9, dtype=DT), torch.randn(10, dtype=DT)]  # 9 features, params have 8
    with pytest.raises(ValueError, match=r"fixed_point\(params, hparams, batch\) failed on the first batch"):
        bl.sid(fo, w0, p.hparams, [wide], fixed_point=fp, outer_batches=[val], inner_steps=1)
    with pytest.raises(ValueError, match=r"outer_loss\(params, hparams, batch\) failed on the first batch"):
        bl.sid(fo, w0, p.hparams, [train], fixed_point=fp, outer_batches=[wide], inner_steps=1)
    with pytest.raises(ValueError, match="first batch"):
        bl.sid(fo, torch.zeros(5, dtype=DT), p.hparams, [train], fixed_point=fp, outer_batches=[val])
    with pytest.raises(ValueError, match="structure and shapes of params"):
        bl.sid(fo, w0, p.hparams, [train], fixed_point=lambda w, lam, b: w[:3], outer_batches=[val])
    with pytest.raises(ValueError, match="scalar"):
        bl.sid(lambda w, lam, b: w, w0, p.hparams, [train], fixed_point=fp, outer_batches=[val])
    with pytest.raises(ValueError, match="v0 should be shaped like params0"):
        bl.sid(fo, w0, p.hparams, [train], fixed_point=fp, outer_batches=[val], v0=torch.zeros(3, dtype=DT))
    with pytest.raises(TypeError, match="share one dtype"):
        bl.sid(fo, w0.float(), p.hparams, [train], fixed_point=fp)


def test_bad_step_sizes_and_options():
    p, train, val, fp, fo = ridge_batched()
    w0 = torch.zeros(8, dtype=DT)
    for bad in (lambda: bl.ConstantStep(0.0), lambda: bl.ConstantStep(-1.0), lambda: bl.ConstantStep(float("nan")),
                lambda: bl.DecreasingStep(0.0, 1.0), lambda: bl.DecreasingStep(1.0, -2.0)):
        with pytest.raises(ValueError, match="> 0"):
            bad()
    assert bl.DecreasingStep.for_contraction(0.5)(0) == 1.0  # β = γ = 2/(1 − q²): η_0 = 1
    with pytest.raises(ValueError, match="contraction"):
        bl.DecreasingStep.for_contraction(1.0)
    for kw in ({"inner_step_size": 0.0}, {"linear_step_size": -0.5}, {"inner_steps": -1}, {"linear_steps": 0},
               {"hparam_batches": 0}):
        with pytest.raises(ValueError):
            bl.sid(fo, w0, p.hparams, [train], fixed_point=fp, outer_batches=[val], **kw)
    with pytest.raises(TypeError, match="step-size value"):
        bl.sid(fo, w0, p.hparams, [train], fixed_point=fp, inner_step_size=bl.DecreasingStep)
    with pytest.raises(TypeError):
        bl.sid(fo, w0, p.hparams, [train], fixed_point=fp, inner_step_size="0.1")
    with pytest.raises(ValueError, match="exactly one"):
        bl.sid(fo, w0, p.hparams, [train])
    with pytest.raises(ValueError, match="exactly one"):
        bl.sid(fo, w0, p.hparams, [train], fixed_point=fp, inner_loss=fo)
    # a step far too large: w + 30(Φ̂(w) − w) is not a contraction
    with pytest.raises(bl.NotContractionError, match="diverged"):
        bl.sid(fo, w0, p.hparams, [train], fixed_point=fp, outer_batches=[val], inner_step_size=30.0)

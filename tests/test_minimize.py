"""newton_cg reaches the exact inner solution (closed form / Newton in float64)."""

import pytest
import torch
from problems import logistic, rel_err, ridge, ridge_dict

import bilevel as bl


@pytest.mark.parametrize("make", [ridge, logistic, ridge_dict], ids=lambda f: f.__name__)
def test_newton_cg_reaches_the_solution(make):
    p = make()
    w0 = torch.utils._pytree.tree_map(torch.zeros_like, p.params)
    w, info = bl.newton_cg(p.inner_loss, w0, p.hparams, tol=1e-13)
    assert info.converged and info.grad_norm < 1e-12
    assert rel_err(w, p.params) < 1e-10
    # and the hypergradient at that solution is exact
    assert rel_err(bl.hypergrad(p.outer_loss, w, p.hparams, inner_loss=p.inner_loss), p.exact) < 1e-9


def test_newton_cg_nonconvex_falls_back_and_descends():
    # double well: Hessian indefinite at the start (w = 0.1), minima at ±1
    loss = lambda w, lam: ((w**2 - 1) ** 2).sum() + lam * 0  # noqa: E731
    w, info = bl.newton_cg(loss, torch.full((3,), 0.1, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    assert info.converged and torch.allclose(w.abs(), torch.ones(3, dtype=torch.float64))


def test_newton_cg_bad_input():
    p = ridge()
    with pytest.raises(ValueError, match="inner_loss should return a scalar"):
        bl.newton_cg(lambda w, lam: w, p.params, p.hparams)
    with pytest.raises(ValueError, match="maxiter"):
        bl.newton_cg(p.inner_loss, p.params, p.hparams, maxiter=-1)
    with pytest.raises(ValueError, match="NaN"):
        bl.newton_cg(p.inner_loss, p.params * float("nan"), p.hparams)

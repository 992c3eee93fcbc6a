"""Automatic budgets: hypergrad(tol=ε) and hypergrad_within(tol=ε) against exact hypergradients."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from error_instances import FAMILIES, ridge

import bilevel


def _solver(inst):
    return bilevel.CG() if inst.inner_loss is not None else bilevel.GMRES()


def test_within_meets_tol_on_random_instances(one_thread):
    """From the cold start, ε = 1e-3 and 1e-6 relative: true error ≤ ε in ≥ 95% of the
    instances where it does not warn, and it warns wherever it missed."""
    met, total, missed_silently = 0, 0, 0
    for fam in ("ridge", "logistic", "linear_fp", "lasso"):
        for seed in range(3):
            for kappa in (2.0, 10.0, 100.0):
                inst = FAMILIES[fam](seed * 7 + int(round(3 * math.log10(kappa))), kappa)
                for rel in (1e-3, 1e-6):
                    eps = rel * inst.exact.norm().item()
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", bilevel.ConvergenceWarning)
                        hg, _, info = bilevel.hypergrad_within(inst.outer_loss, inst.w0, inst.hparams, tol=eps,
                                                               inner_step=inst.step, solver=_solver(inst),
                                                               **inst.form)
                    ok = (hg - inst.exact).norm().item() <= eps
                    if not caught:
                        total += 1
                        met += ok
                    missed_silently += (not ok) and not caught
                    assert info.inner_iterations > 0 and float(info.error_estimate) <= eps or caught
    print(f"\nhypergrad_within: true error <= tol in {met}/{total}")
    assert total >= 60
    assert met / total >= 0.95


def test_hypergrad_tol_at_the_inner_solution():
    """With an exact inner solution, tol= picks K: the true error is ≤ ε, and a tighter ε
    costs more iterations."""
    inst = ridge(5, 1e3, d=12)
    its = []
    for eps in (1e-2, 1e-5, 1e-8):
        hg, info = bilevel.hypergrad(inst.outer_loss, inst.w_star, inst.hparams, inner_loss=inst.inner_loss,
                                     tol=eps, return_info=True)
        assert (hg - inst.exact).norm().item() <= eps
        assert float(info.error_estimate) <= eps
        its.append(info.iterations)
    assert its[0] <= its[1] <= its[2]


def test_tol_warns_when_the_inner_error_alone_exceeds_it():
    inst = ridge(2, 100.0)
    w = inst.run_inner(5)
    with pytest.warns(bilevel.ConvergenceWarning, match="inner error alone.*solve the inner problem further"):
        _, info = bilevel.hypergrad(inst.outer_loss, w, inst.hparams, inner_loss=inst.inner_loss, tol=1e-8,
                                    return_info=True, inner_tol=math.inf)
    assert float(info.error.inner) > 1e-8
    assert float(info.error.linear) <= 0.5e-8 * 10  # the linear part was still brought down


def test_tol_warns_when_maxiter_is_too_small():
    inst = ridge(2, 1e3)
    with pytest.warns(bilevel.ConvergenceWarning, match="raise the solver's maxiter"):
        bilevel.hypergrad(inst.outer_loss, inst.w_star, inst.hparams, inner_loss=inst.inner_loss,
                          tol=1e-6 * inst.exact.norm().item(), solver=bilevel.CG(maxiter=2))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, True, "1e-3"])
def test_tol_must_be_a_positive_float(bad):
    inst = ridge(0, 10.0)
    with pytest.raises(ValueError, match="tol"):
        bilevel.hypergrad(inst.outer_loss, inst.w_star, inst.hparams, inner_loss=inst.inner_loss, tol=bad)
    with pytest.raises(ValueError, match="tol"):
        bilevel.hypergrad_within(inst.outer_loss, inst.w0, inst.hparams, tol=bad, inner_step=inst.step,
                                 inner_loss=inst.inner_loss)


def test_within_needs_an_inner_step_for_an_inner_loss():
    inst = ridge(0, 10.0)
    with pytest.raises(ValueError, match="inner_step"):
        bilevel.hypergrad_within(inst.outer_loss, inst.w0, inst.hparams, tol=1e-3, inner_loss=inst.inner_loss)


def test_within_needs_exactly_one_form_before_any_inner_step():
    inst = ridge(0, 10.0)
    calls = []

    def step(w, lam):
        calls.append(1)
        return inst.step(w, lam)

    with pytest.raises(ValueError, match="exactly one"):
        bilevel.hypergrad_within(inst.outer_loss, inst.w0, inst.hparams, tol=1e-3, inner_step=step)
    assert not calls


@pytest.mark.parametrize("wrong", [lambda w: w[:-1], lambda w: w.float(), lambda w: {"w": w}])
def test_within_refuses_an_inner_step_that_changes_the_shape_of_params(wrong):
    inst = ridge(0, 10.0)
    with pytest.raises(ValueError, match="inner iterations: one step should return .* structure and shapes of params"):
        bilevel.hypergrad_within(inst.outer_loss, inst.w0, inst.hparams, tol=1e-3, inner_loss=inst.inner_loss,
                                 inner_step=lambda w, lam: wrong(inst.step(w, lam)))


def test_within_warm_start_across_outer_steps():
    """A second call at nearby hparams, warm-started with the returned params and info.v,
    needs far fewer inner steps than the first."""
    inst = ridge(4, 100.0)
    eps = 1e-6 * inst.exact.norm().item()
    hg, w, info = bilevel.hypergrad_within(inst.outer_loss, inst.w0, inst.hparams, tol=eps, inner_step=inst.step,
                                           inner_loss=inst.inner_loss)
    lam2 = inst.hparams + 1e-4
    _, _, info2 = bilevel.hypergrad_within(inst.outer_loss, w, lam2, tol=eps, inner_step=inst.step,
                                           inner_loss=inst.inner_loss, init=info.v)
    assert info2.inner_iterations < 0.5 * info.inner_iterations


def test_within_fixed_point_form_and_max_inner_warning():
    inst = FAMILIES["linear_fp"](3, 100.0)
    eps = 1e-6 * inst.exact.norm().item()
    hg, w, info = bilevel.hypergrad_within(inst.outer_loss, inst.w0, inst.hparams, tol=eps,
                                           fixed_point=inst.fixed_point, solver=bilevel.GMRES())
    assert (hg - inst.exact).norm().item() <= eps
    with pytest.warns(bilevel.ConvergenceWarning, match="max_inner"):
        bilevel.hypergrad_within(inst.outer_loss, inst.w0, inst.hparams, tol=eps, fixed_point=inst.fixed_point,
                                 solver=bilevel.GMRES(), max_inner=3)


def test_aid_bilevel_with_tol_shrinks_eps():
    """AIDBilevel(tol=...): hypergradients within a tolerance that shrinks with the outer
    steps (inexact hypergradient descent); the outer loss decreases."""
    inst = ridge(6, 10.0)
    solver = bilevel.AIDBilevel(inst.outer_loss, inst.w0, inner_loss=inst.inner_loss, lr=0.05, tol=1e-2,
                                inner_step_size=1.0 / 1.2, warm_start=True)
    state, infos = solver.run(inst.hparams, 8)
    assert infos[-1].outer_loss < infos[0].outer_loss
    assert all(i.hypergrad_error is not None for i in infos)
    assert infos[-1].hypergrad_error <= 1e-2 / 8 ** 0.5 * 1.0001
    assert torch.isfinite(state.hparams).all()


def test_itd_bilevel_estimates_its_error():
    """ITDBilevel(estimate=True): each step's ITD hypergradient comes with hypergrad_error's
    estimate, which bounds its true error (here at the first step, where ∇F is known)."""
    inst = ridge(7, 10.0)
    eta = 0.5
    solver = bilevel.ITDBilevel(inst.outer_loss, inst.w0, inner_loss=inst.inner_loss, lr=1.0, inner_steps=15,
                                inner_step_size=eta, estimate=True)
    state = solver.init(inst.hparams)
    new, info = solver.step(state)
    hg = inst.hparams - new.hparams  # λ ← λ − lr·ĝ with lr = 1
    true = (hg - inst.exact).norm().item()
    assert info.hypergrad_error is not None and info.hypergrad_error >= true > 1e-8
    plain = bilevel.ITDBilevel(inst.outer_loss, inst.w0, inner_loss=inst.inner_loss, lr=1.0, inner_steps=15,
                               inner_step_size=eta)
    _, pinfo = plain.step(plain.init(inst.hparams))
    assert pinfo.hypergrad_error is None and info.samples > pinfo.samples

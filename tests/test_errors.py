"""Bad input gets an error that names the problem (never a silently wrong number)."""

import pytest
import torch
from problems import linear_fixed_point, ridge

import bilevel as bl
from bilevel.linear_solve import NotContractionError, SolverError


@pytest.fixture
def p():
    return ridge()


def test_outer_loss_not_scalar(p):
    with pytest.raises(ValueError, match="outer_loss should return a scalar"):
        bl.hypergrad(lambda w, lam: w * 2, p.params, p.hparams, inner_loss=p.inner_loss)


def test_inner_loss_not_scalar(p):
    with pytest.raises(ValueError, match="inner_loss should return a scalar"):
        bl.hypergrad(p.outer_loss, p.params, p.hparams, inner_loss=lambda w, lam: w**2)


def test_both_or_neither_inner_form(p):
    with pytest.raises(ValueError, match="exactly one of inner_loss"):
        bl.hypergrad(p.outer_loss, p.params, p.hparams)
    with pytest.raises(ValueError, match="exactly one of inner_loss"):
        bl.hypergrad(p.outer_loss, p.params, p.hparams, inner_loss=p.inner_loss, fixed_point=p.step)


def test_fixed_point_output_mismatch(p):
    with pytest.raises(ValueError, match="structure and shapes of params"):
        bl.hypergrad(p.outer_loss, p.params, p.hparams, fixed_point=lambda w, lam: w[:-1])
    with pytest.raises(ValueError, match="structure and shapes of params"):
        bl.hypergrad(p.outer_loss, p.params, p.hparams, fixed_point=lambda w, lam: (w,))


def test_params_structure_mismatch_with_losses(p):
    # params given as a dict while the losses index a tensor: the user's function fails;
    # params of the wrong length: the loss raises a shape error, not a wrong number
    with pytest.raises(RuntimeError):
        bl.hypergrad(p.outer_loss, p.params[:-1], p.hparams, inner_loss=p.inner_loss)


def test_solver_not_a_solver_value(p):
    for bad in ("cg", bl.CG, None, 3):
        with pytest.raises(TypeError, match="solver"):
            bl.hypergrad(p.outer_loss, p.params, p.hparams, inner_loss=p.inner_loss, solver=bad)


def test_nan_inf_inputs(p):
    w = p.params.clone()
    w[0] = float("nan")
    with pytest.raises(ValueError, match="params contains NaN"):
        bl.hypergrad(p.outer_loss, w, p.hparams, inner_loss=p.inner_loss)
    lam = p.hparams.clone()
    lam[1] = float("inf")
    with pytest.raises(ValueError, match="hparams contains NaN or Inf"):
        bl.hypergrad(p.outer_loss, p.params, lam, inner_loss=p.inner_loss)


def test_nan_reaching_the_solver(p):
    # the outer loss is finite, its gradient is not (sqrt at 0): caught before solving
    with pytest.raises(SolverError, match="NaN or Inf"):
        bl.hypergrad(lambda w, lam: torch.sqrt((w * 0).sum()), p.params, p.hparams, inner_loss=p.inner_loss)
    # the inner Hessian produces NaN inside the solve
    with pytest.raises(SolverError, match="NaN or Inf"):
        bl.hypergrad(p.outer_loss, p.params, p.hparams,
                     inner_loss=lambda w, lam: p.inner_loss(w, lam) + torch.sqrt(w * 0 + 0.0).sum() * 0)


def test_not_a_contraction():
    # Φ(w, λ) = 1.3·Q w + λ, Q orthogonal: spectral radius 1.3, AID-FP diverges
    Q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    lam = torch.ones(6, dtype=torch.float64)
    w = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - 1.3 * Q, lam)
    for solver in (bl.FixedPoint(), bl.Neumann()):
        with pytest.raises(NotContractionError, match="not a contraction"):
            bl.hypergrad(lambda w, lam: (w**2).sum(), w, lam, fixed_point=lambda w, lam: 1.3 * Q @ w + lam,
                         solver=solver)


def test_cg_refuses_non_symmetric_fixed_point():
    q = linear_fixed_point()
    with pytest.raises(ValueError, match="not symmetric.*GMRES"):
        bl.hypergrad(q.outer_loss, q.params, q.hparams, fixed_point=q.fixed_point, solver=bl.CG())


def test_unused_hparam_is_an_error(p):
    hparams = {"lam": p.hparams, "unused": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"\['unused'\] reaches neither"):
        bl.hypergrad(lambda w, h: p.outer_loss(w, h["lam"]), p.params, hparams,
                     inner_loss=lambda w, h: p.inner_loss(w, h["lam"]))
    # a leaf that enters the inner loss but not its gradient in w cannot move w(λ) either
    with pytest.raises(ValueError, match="reaches neither"):
        bl.hypergrad(lambda w, h: p.outer_loss(w, h["lam"]), p.params, hparams,
                     inner_loss=lambda w, h: p.inner_loss(w, h["lam"]) + h["unused"].sum())


def test_used_hparam_with_zero_hypergradient_is_fine(p):
    # the leaf reaches the outer loss, with zero derivative at this point: no error
    hparams = {"lam": p.hparams, "c": torch.zeros(2, dtype=torch.float64)}
    hg = bl.hypergrad(lambda w, h: p.outer_loss(w, h["lam"]) + (h["c"] ** 2).sum(), p.params, hparams,
                      inner_loss=lambda w, h: p.inner_loss(w, h["lam"]))
    assert torch.all(hg["c"] == 0)


def test_dtype_and_type_problems(p):
    with pytest.raises(TypeError, match="share one dtype"):
        bl.hypergrad(p.outer_loss, p.params.float(), p.hparams, inner_loss=p.inner_loss)
    with pytest.raises(TypeError, match="floating-point"):
        bl.hypergrad(p.outer_loss, p.params, torch.ones(8, dtype=torch.int64), inner_loss=p.inner_loss)
    with pytest.raises(TypeError, match="pytree"):
        bl.hypergrad(p.outer_loss, p.params, [1.0, 2.0], inner_loss=p.inner_loss)


def test_init_shape_mismatch(p):
    with pytest.raises(ValueError, match="init should be shaped like params"):
        bl.hypergrad(p.outer_loss, p.params, p.hparams, inner_loss=p.inner_loss, init=p.params[:2])


def test_does_not_touch_user_tensors(p):
    w = p.params.clone().requires_grad_()
    lam = p.hparams.clone().requires_grad_()
    hg = bl.hypergrad(p.outer_loss, w, lam, inner_loss=p.inner_loss)
    assert w.grad is None and lam.grad is None and not hg.requires_grad

"""ITD (reverse, truncated, checkpointed) and forward mode, against exact answers and each other."""

import pytest
import torch
from problems import linear_fixed_point, logistic, rel_err, ridge, ridge_dict

import bilevel as bl


def _itd(p, steps, **kw):
    lam = torch.utils._pytree.tree_map(lambda t: t.detach().requires_grad_(), p.hparams)
    wT = bl.unroll(p.step, p.params0, lam, steps, **kw)
    leaves = torch.utils._pytree.tree_leaves(lam)
    grads = torch.autograd.grad(p.outer_loss(wT, lam), leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return torch.utils._pytree.tree_unflatten(grads, torch.utils._pytree.tree_flatten(lam)[1])


@pytest.mark.parametrize("make", [ridge, logistic, linear_fixed_point, ridge_dict], ids=lambda f: f.__name__)
def test_itd_converges_to_exact(make):
    p = make()
    errs = [rel_err(_itd(p, T), p.exact) for T in (5, 20, 80, 1500)]
    assert all(b < a for a, b in zip(errs, errs[1:]) if a > 1e-13), errs
    assert errs[-1] < 1e-8, errs


def test_truncated_itd_memory_does_not_grow_with_steps():
    p = ridge()

    def graph_size(steps, truncate):
        lam = p.hparams.detach().requires_grad_()
        wT = bl.unroll(p.step, p.params0, lam, steps, truncate=truncate)
        return len(_graph_nodes(wT))

    assert graph_size(50, 5) == graph_size(500, 5)
    assert graph_size(500, None) > 5 * graph_size(500, 5)


def test_truncated_equals_manual_truncation_and_full():
    p = logistic()
    with torch.no_grad():
        w = p.params0
        for _ in range(30):
            w = p.step(w, p.hparams)
    lam = p.hparams.detach().requires_grad_()
    w_k = w
    for _ in range(10):
        w_k = p.step(w_k, lam)
    expected = torch.autograd.grad(p.outer_loss(w_k, lam), lam)[0]
    got = _itd(p, 40, truncate=10)
    assert torch.allclose(got, expected, rtol=1e-13, atol=1e-15)
    assert torch.allclose(_itd(p, 40, truncate=40), _itd(p, 40), rtol=1e-13)


def test_checkpointed_equals_plain():
    p = ridge_dict()
    a, b = _itd(p, 37), _itd(p, 37, checkpoint=True)
    assert rel_err(a, b) < 1e-13


def _graph_nodes(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return seen


# logistic's step calls torch.func.grad (torch.utils.checkpoint's saved-tensor hooks refused
# it); ridge's step is plain autograd
@pytest.mark.parametrize("make", [logistic, ridge], ids=lambda f: f.__name__)
@pytest.mark.parametrize("steps", [2, 3, 37, 200])
def test_checkpointed_equals_full_itd(make, steps):
    p = make()
    full, ckpt = _itd(p, steps), _itd(p, steps, checkpoint=True)
    assert (full - ckpt).abs().max() <= 1e-12 * full.abs().max(), rel_err(ckpt, full)
    assert rel_err(_itd(p, steps, truncate=steps // 2, checkpoint=True), _itd(p, steps, truncate=steps // 2)) < 1e-12


@pytest.mark.parametrize("make", [logistic, ridge], ids=lambda f: f.__name__)
def test_checkpointed_inside_torch_func_grad_and_second_order(make):
    p = make()

    def F(lam, checkpoint):
        return p.outer_loss(bl.unroll(p.step, p.params0, lam, 30, checkpoint=checkpoint), lam)

    g_full = torch.func.grad(F)(p.hparams, False)
    assert rel_err(torch.func.grad(F)(p.hparams, True), g_full) < 1e-12
    assert rel_err(g_full, _itd(p, 30)) < 1e-12

    def hvp(checkpoint):  # Hessian of F times ones, by double backward through the segments
        lam = p.hparams.detach().requires_grad_()
        (g,) = torch.autograd.grad(F(lam, checkpoint), lam, create_graph=True)
        return torch.autograd.grad(g.sum(), lam)[0]

    assert rel_err(hvp(True), hvp(False)) < 1e-12


def test_checkpointed_step_calling_autograd_grad():
    # a step that differentiates by torch.autograd.grad (needs grad mode and w_t requiring
    # grad in the forward pass too, as in a recorded unroll)
    p = logistic()

    def step(w, lam):
        return w - 0.5 * torch.autograd.grad(p.inner_loss(w, lam), w, create_graph=True)[0]

    def grads(checkpoint):
        lam = p.hparams.detach().requires_grad_()
        w0 = torch.zeros_like(p.params0, requires_grad=True)
        wT = bl.unroll(step, w0, lam, 40, checkpoint=checkpoint)
        return torch.autograd.grad(p.outer_loss(wT, lam), [lam, w0])

    for a, c in zip(grads(False), grads(True)):
        assert (a - c).abs().max() <= 1e-12 * a.abs().max()


def test_checkpointed_graph_has_one_node_per_segment():
    # 400 steps in segments of 20: the graph is 20 segment nodes, not 400 steps' worth
    p = ridge()
    lam = p.hparams.detach().requires_grad_()
    nodes = _graph_nodes(bl.unroll(p.step, p.params0, lam, 400, checkpoint=True))
    assert sum(type(n).__name__ == "_SegmentBackward" for n in nodes) == 20
    assert len(nodes) <= 25
    assert len(_graph_nodes(bl.unroll(p.step, p.params0, lam, 400))) > 400


def test_checkpointed_step_returning_a_leaf_unchanged():
    g = torch.Generator().manual_seed(0)
    A = 0.2 * torch.randn(4, 4, generator=g, dtype=torch.float64)

    def step(w, lam):
        return {"a": A @ w["a"] + lam * w["b"], "b": w["b"]}

    def grads(checkpoint):
        lam = torch.ones(4, dtype=torch.float64, requires_grad=True)
        b = torch.linspace(1, 2, 4, dtype=torch.float64, requires_grad=True)
        wT = bl.unroll(step, {"a": torch.zeros(4, dtype=torch.float64), "b": b}, lam, 10, checkpoint=checkpoint)
        return torch.autograd.grad(wT["a"].sum() + 2 * wT["b"].sum(), [lam, b])

    for a, c in zip(grads(False), grads(True)):
        assert torch.allclose(a, c, rtol=1e-13, atol=0)


def test_forward_mode_equals_reverse_mode():
    p = ridge_dict()
    fwd, wT = bl.forward_hypergrad(p.outer_loss, p.step, p.params0, p.hparams, 60, return_params=True)
    assert rel_err(fwd, _itd(p, 60)) < 1e-12
    assert rel_err(wT, bl.unroll(p.step, p.params0, p.hparams, 60)) < 1e-14


def test_forward_mode_learning_rate_schedule_against_finite_differences():
    # hyperparameters = one learning rate per step (Far-HO's use case), step(w, lr, t)
    p = logistic()
    T = 15
    lrs = torch.full((T,), 0.5, dtype=torch.float64)
    inner_grad = torch.func.grad(p.inner_loss)

    def step(w, lrs, t):
        return w - lrs[t] * inner_grad(w, p.hparams)

    def outer(w, lrs):
        return p.outer_loss(w, p.hparams)

    hg = bl.forward_hypergrad(outer, step, p.params0, lrs, T, indexed=True)

    def F(lrs):
        return outer(bl.unroll(step, p.params0, lrs, T, indexed=True), lrs)

    fd = torch.autograd.functional.jacobian(F, lrs)  # reverse mode: exact for this unroll
    assert torch.allclose(hg, fd, rtol=1e-12, atol=1e-15)
    h = 1e-6
    for t in (0, T // 2, T - 1):
        e = torch.zeros(T, dtype=torch.float64)
        e[t] = h
        assert hg[t].item() == pytest.approx(((F(lrs + e) - F(lrs - e)) / (2 * h)).item(), rel=1e-6)


def test_unroll_inside_torch_func_grad():
    p = ridge()
    g = torch.func.grad(lambda lam: p.outer_loss(bl.unroll(p.step, p.params0, lam, 50, truncate=20), lam))
    assert torch.allclose(g(p.hparams), _itd(p, 50, truncate=20), rtol=1e-12)


def test_unroll_bad_input():
    p = ridge()
    with pytest.raises(ValueError, match="truncate"):
        bl.unroll(p.step, p.params0, p.hparams, 10, truncate=11)
    with pytest.raises(ValueError, match="steps"):
        bl.unroll(p.step, p.params0, p.hparams, -1)
    with pytest.raises(ValueError, match="structure and shapes of params"):
        bl.unroll(lambda w, lam: w[:-1], p.params0, p.hparams, 3)

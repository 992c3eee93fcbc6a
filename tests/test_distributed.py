"""Data-parallel hypergradients: 2 gloo ranks on loopback equal one process on all the data.

The ranks are spawned from pytest (torch.multiprocessing, ``spawn``) and talk over
127.0.0.1 only (``tcp://127.0.0.1:<free port>``, ``GLOO_SOCKET_IFNAME=lo``).  One spawn runs
every scenario that keeps the group healthy and sends plain floats back; a second one
checks that a rank that dies makes its peer fail fast instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bilevel as bl
from bilevel.distributed import DistributedError, data_parallel, shard

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

D = 6
N_TRAIN, N_VAL = 40, 30
TRAIN_CUTS, VAL_CUTS = (0, 9, 40), (0, 17, 30)  # uneven shards: 9 + 31 and 17 + 13
ETA, STEPS = 0.6, 15
TIMEOUT_S = 8


# ---------------------------------------------------------------- the problem (any process)

def _full_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N_TRAIN + N_VAL, D, generator=g, dtype=torch.float64)
    y = torch.sign(X @ torch.randn(D, generator=g, dtype=torch.float64)
                   + 0.5 * torch.randn(N_TRAIN + N_VAL, generator=g, dtype=torch.float64))
    return X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]


def _losses(X, y, Xv, yv):
    """Logistic regression, per-feature L2 penalty e^λ (a mean over the data + a penalty)."""

    def inner_loss(w, lam):
        return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(w, lam):
        return torch.nn.functional.softplus(-yv * (Xv @ w)).mean()

    return inner_loss, outer_loss


def _step(inner_loss):
    return lambda w, lam: w - ETA * torch.func.grad(inner_loss)(w, lam)


def _solution():
    """Inner minimiser by Newton on the full data (same bits in every process) and λ."""
    X, y, _, _ = _full_data()
    lam = torch.linspace(-1.5, 0.0, D, dtype=torch.float64)
    w = torch.zeros(D, dtype=torch.float64)
    for _ in range(12):  # closed-form gradient and Hessian of the logistic loss: fast
        s = torch.sigmoid(-y * (X @ w))
        grad = -X.T @ (y * s) / N_TRAIN + lam.exp() * w
        hess = X.T @ (X * (s * (1 - s))[:, None]) / N_TRAIN + torch.diag(lam.exp())
        w = w - torch.linalg.solve(hess, grad)
    return w, lam


SOLVERS = {"CG": bl.CG(), "MINRES": bl.MINRES(), "GMRES": bl.GMRES(), "Dense": bl.Dense()}
FP_SOLVERS = {"FixedPoint": bl.FixedPoint(maxiter=500), "Neumann": bl.Neumann(maxiter=500),
              "NormalCG": bl.NormalCG()}


def _hypergradients(inner_loss, outer_loss):
    """Every method on one (inner_loss, outer_loss) pair; plain floats so they travel."""
    w, lam = _solution()
    step = _step(inner_loss)
    out = {}
    for name, s in SOLVERS.items():
        hg, info = bl.hypergrad(outer_loss, w, lam, inner_loss=inner_loss, solver=s, return_info=True)
        out[f"aid-{name}"] = hg.tolist()
        out[f"iters-{name}"] = info.iterations
    for name, s in FP_SOLVERS.items():
        hg, info = bl.hypergrad(outer_loss, w, lam, fixed_point=step, solver=s, return_info=True)
        out[f"aid-fp-{name}"] = hg.tolist()
        out[f"iters-fp-{name}"] = info.iterations
    lam_r = lam.clone().requires_grad_()
    wT = bl.unroll(step, torch.zeros(D, dtype=torch.float64), lam_r, STEPS)
    out["itd"] = torch.autograd.grad(outer_loss(wT, lam_r), lam_r)[0].tolist()
    wT = bl.unroll(step, torch.zeros(D, dtype=torch.float64), lam_r, STEPS, truncate=5)
    out["itd-truncated"] = torch.autograd.grad(outer_loss(wT, lam_r), lam_r)[0].tolist()

    def autograd_step(w, lam):  # a step that calls torch.autograd.grad itself
        return w - ETA * torch.autograd.grad(inner_loss(w, lam), w, create_graph=True)[0]

    w0 = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    wT = bl.unroll(autograd_step, w0, lam_r, STEPS, checkpoint=True)
    out["itd-checkpointed"] = torch.autograd.grad(outer_loss(wT, lam_r), lam_r)[0].tolist()
    out["fmd"] = bl.forward_hypergrad(outer_loss, step, torch.zeros(D, dtype=torch.float64), lam, STEPS).tolist()
    return out


def _exact():
    inner_loss, outer_loss = _losses(*_full_data())
    w, lam = _solution()
    H = torch.func.hessian(inner_loss)(w, lam)
    return -lam.exp() * w * torch.linalg.solve(H, torch.func.grad(outer_loss)(w, lam))


# ---------------------------------------------------------------- spawning ranks on loopback

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _entry(worker, rank, world, port, queue):
    try:
        _init(rank, world, port)
        worker(rank, lambda res: queue.put((rank, res)))
    except BaseException:
        queue.put((rank, {"crash": traceback.format_exc()}))


def _spawn(worker, world=2, limit_s=50.0):
    """Start ``worker(rank, send)`` on ``world`` gloo ranks; returns ``collect()``, which waits
    until they all exit or ``limit_s`` passes (then kills them: a hang fails the test, never
    blocks it) and returns {rank: the merged dicts the rank sent}."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, world, port, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit_s
    return lambda: _collect(procs, queue, deadline)


def _collect(procs, queue, deadline):
    results: dict[int, dict] = {r: {} for r in range(len(procs))}
    try:
        while time.monotonic() < deadline and (any(p.is_alive() for p in procs) or not queue.empty()):
            try:
                rank, res = queue.get(timeout=0.2)
            except Exception:  # queue.Empty
                continue
            results[rank].update(res)
    finally:
        for p in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.kill()
    return results


def _error(fn):
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


BATCH_CUTS = (0, 3, 8)  # a global minibatch of 8 = 3 samples on rank 0 + 5 on rank 1


def _batches(rank=None):
    """Minibatches (X, y) of train and validation: rank ``r``'s part, or whole (None)."""
    X, y, Xv, yv = _full_data()
    part = slice(None) if rank is None else slice(*BATCH_CUTS[rank:rank + 2])
    train = [(X[i:i + 8][part], y[i:i + 8][part]) for i in range(0, 32, 8)]
    val = [(Xv[i:i + 8][part], yv[i:i + 8][part]) for i in range(0, 24, 8)]
    return train, val


def _batch_losses():
    def inner_loss(w, lam, batch):
        X, y = batch
        return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(w, lam, batch):
        X, y = batch
        return torch.nn.functional.softplus(-y * (X @ w)).mean()

    return inner_loss, outer_loss


def _composed(inner_loss, outer_loss, batch_inner, batch_outer, train, val):
    """``bilevel.implicit`` and stochastic ``bilevel.sid`` on the given (wrapped or not) losses."""
    w, lam = _solution()
    out = {}
    if hasattr(bl, "implicit"):
        @bl.implicit(inner_loss=inner_loss)
        def solve(params0, hparams):
            return w  # any solver; the backward is the IFT at its output

        lam_r = lam.clone().requires_grad_()
        out["implicit"] = torch.autograd.grad(outer_loss(solve(w, lam_r), lam_r), lam_r)[0].tolist()
    if hasattr(bl, "sid"):
        out["sid"] = bl.sid(batch_outer, torch.zeros(D, dtype=torch.float64), lam, train,
                            inner_loss=batch_inner, outer_batches=val, inner_steps=12, linear_steps=12,
                            inner_step_size=0.5, linear_step_size=0.5).tolist()
    return out


def _compositions(rank=None):
    X, y, Xv, yv = _full_data()
    bi, bo = _batch_losses()
    if rank is None:
        return _composed(*_losses(X, y, Xv, yv), bi, bo, *_batches())
    sl, slv = slice(*TRAIN_CUTS[rank:rank + 2]), slice(*VAL_CUTS[rank:rank + 2])
    li, lo = _losses(X[sl], y[sl], Xv[slv], yv[slv])
    count = lambda batch: len(batch[1])  # noqa: E731
    return _composed(data_parallel(li, sl.stop - sl.start), data_parallel(lo, slv.stop - slv.start),
                     data_parallel(bi, count), data_parallel(bo, count), *_batches(rank))


def _worker(rank, send):
    X, y, Xv, yv = _full_data()
    sl, slv = slice(*TRAIN_CUTS[rank:rank + 2]), slice(*VAL_CUTS[rank:rank + 2])
    local_inner, local_outer = _losses(X[sl], y[sl], Xv[slv], yv[slv])
    inner = data_parallel(local_inner, sl.stop - sl.start)
    outer = data_parallel(local_outer, slv.stop - slv.start)
    res = _hypergradients(inner, outer)

    # Equal weights instead of n_r/N: what a plain average of the shard means would give.
    n = sl.stop - sl.start
    naive_inner = data_parallel(lambda w, lam: local_inner(w, lam) * N_TRAIN / (2 * n), n)
    w, lam = _solution()
    res["naive"] = bl.hypergrad(outer, w, lam, inner_loss=naive_inner).tolist()

    # A bad batch on rank 1 (wrong number of features): rank 1 sees its own error, rank 0 a
    # DistributedError naming rank 1 -- then the group is still in step and usable.
    Xb = X[sl][:, :3] if rank == 1 else X[sl]
    bad = data_parallel(_losses(Xb, y[sl], Xv[slv], yv[slv])[0], sl.stop - sl.start)
    res["bad_batch"] = _error(lambda: bl.hypergrad(outer, w, lam, inner_loss=bad))
    res["after_bad"] = bl.hypergrad(outer, w, lam, inner_loss=inner).tolist()

    # params out of sync across ranks: refused on every rank.
    res["desync"] = _error(lambda: bl.hypergrad(outer, w + rank * 1e-3, lam, inner_loss=inner))
    # an output whose size depends on the shard (per-sample losses): refused on every rank.
    res["sizes"] = _error(lambda: data_parallel(lambda w, lam: X[sl] @ w, 1)(w, lam))
    # an empty shard: refused on every rank.
    res["empty"] = _error(lambda: data_parallel(local_inner, 0 if rank == 1 else 5)(w, lam))
    # The other methods take the same wrapped functions (skipped where not yet in bilevel).
    res.update(_compositions(rank))
    # shard(): balanced contiguous blocks.
    res["shard"] = shard(torch.arange(7)).tolist()
    send(res)

    # Last, rank 1 raises outside any collective and its process exits: rank 0, in its
    # next collective, must fail with a DistributedError (not hang).
    if rank == 1:
        raise ValueError("bad batch on rank 1")
    t0 = time.monotonic()
    send({"dead_peer": _error(lambda: bl.hypergrad(outer, w, lam, inner_loss=inner)),
          "dead_peer_s": time.monotonic() - t0})


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def spawned():
    """The two ranks' results and the one-process reference (computed while they run)."""
    collect = _spawn(_worker)
    reference = {**_hypergradients(*_losses(*_full_data())), **_compositions()}
    res = collect()
    assert "crash" not in res[0], res[0]["crash"]
    assert "bad batch on rank 1" in res[1].get("crash", ""), res[1].get("crash")
    return res, reference


@pytest.fixture(scope="module")
def ranks(spawned):
    return spawned[0]


@pytest.fixture(scope="module")
def reference(spawned):
    return spawned[1]


def _rel(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


METHODS = ([f"aid-{s}" for s in SOLVERS] + [f"aid-fp-{s}" for s in FP_SOLVERS]
           + ["itd", "itd-truncated", "itd-checkpointed", "fmd"])


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process(ranks, reference, method):
    for r in (0, 1):
        assert _rel(ranks[r][method], reference[method]) <= 1e-12, (r, method)
    assert ranks[0][method] == ranks[1][method]  # bitwise the same on every rank


@pytest.mark.parametrize("method", ["implicit", "sid"])
def test_other_methods_compose(ranks, reference, method):
    if method not in reference:
        pytest.skip(f"bilevel.{method} is not there yet")
    for r in (0, 1):
        assert _rel(ranks[r][method], reference[method]) <= 1e-12, (r, method)
    assert ranks[0][method] == ranks[1][method]


def test_reference_is_the_exact_hypergradient(reference):
    exact = _exact().tolist()
    for m in METHODS:
        if m.startswith("aid"):
            assert _rel(reference[m], exact) <= 1e-8, m


def test_solvers_take_the_same_decisions_on_every_rank(ranks, reference):
    for k in reference:
        if k.startswith("iters-"):
            assert ranks[0][k] == ranks[1][k] == reference[k], k


def test_uneven_shards_are_weighted_by_size(ranks, reference):
    # Shards of 9 and 31 samples: weighting each shard's mean equally is a different problem.
    assert _rel(ranks[0]["naive"], reference["aid-CG"]) > 1e-3


def test_a_bad_batch_fails_every_rank_clearly(ranks, reference):
    assert ranks[1]["bad_batch"].startswith("RuntimeError")  # rank 1's own error
    assert ranks[0]["bad_batch"].startswith(DistributedError.__name__) and "rank 1 raised" in ranks[0]["bad_batch"]
    for r in (0, 1):  # and nobody is out of step afterwards
        assert _rel(ranks[r]["after_bad"], reference["aid-CG"]) <= 1e-12


def test_misuse_is_refused_on_every_rank(ranks):
    for r in (0, 1):
        assert ranks[r]["desync"].startswith(DistributedError.__name__) and "differ across ranks" in ranks[r]["desync"]
        assert ranks[r]["sizes"].startswith(DistributedError.__name__) and "same shapes" in ranks[r]["sizes"]
        assert ranks[r]["empty"].startswith("ValueError") and "hold no data" in ranks[r]["empty"]
    assert ranks[0]["shard"] == [0, 1, 2, 3] and ranks[1]["shard"] == [4, 5, 6]


def test_a_rank_that_dies_does_not_hang_the_others(ranks):
    assert ranks[0]["dead_peer"].startswith(DistributedError.__name__), ranks[0]["dead_peer"]
    assert ranks[0]["dead_peer_s"] < TIMEOUT_S + 2


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        data_parallel(lambda w, lam: w.sum(), 3)

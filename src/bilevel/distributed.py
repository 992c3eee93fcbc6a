"""Data-parallel hypergradients over ``torch.distributed`` ranks.

Each rank holds a shard of the data and the *same* ``params`` and ``hparams``.  A loss that
is a mean over data splits as a weighted mean of the shards' means,

    g(w, λ) = Σ_r (n_r / N) · g_r(w, λ),      N = Σ_r n_r,

and because the weights sum to one, a term every rank adds identically (a penalty
``½ Σ e^{λ_j} w_j²``) is kept exactly once.  :func:`data_parallel` turns the local
``g_r`` into ``g`` on every rank with two linear operators that are each other's
transpose (the conjugate pair of Megatron-LM, Shoeybi et al., 2019):

* ``replicate``: identity forward; all-reduce (sum) of the cotangents backward, so the
  gradient of a replicated tensor is the sum of the shards' contributions;
* ``reduce``: all-reduce (sum) forward; ``replicate`` backward.

The backward of each is the other, so derivatives of any order — the gradient, the
Hessian– and Jacobian–vector products inside every solver of :func:`bilevel.hypergrad`,
reverse mode through :func:`bilevel.unroll`, forward mode — are the derivatives of the
global ``g`` and are identical on every rank.  Both are ``torch.autograd.Function`` with
``setup_context``, ``jvp`` and ``vmap`` rules, so they work under ``torch.func`` (grad,
vjp, jvp, vmap) as well as plain autograd; the stock
``torch.distributed.nn.functional.all_reduce`` does neither (it has no functorch support,
and its backward all-reduces a replicated cotangent, which scales gradients by N).

The core is not changed: wrap the losses (or the fixed-point map, or the ITD step) and call
``hypergrad`` / ``unroll`` as on one process.  Communication: one all-reduce of
``|params|`` numbers per Hessian/Jacobian–vector product, and two per evaluation of a
wrapped function: a consistency check (4 numbers per rank, see :func:`data_parallel`)
and the value.  On one rank nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from bilevel import _tree as T

__all__ = ["data_parallel", "shard", "DistributedError"]

Leaves = list[torch.Tensor]


class DistributedError(RuntimeError):
    """Another rank failed (raised, disagreed on inputs, or the collective broke)."""


def _all_reduce(buf: torch.Tensor, op: Any, group: Any, what: str = "all-reduce") -> None:
    """The one place every collective of this module goes through (the benchmark counts it).
    A failure means another rank is gone or raised: say so as a DistributedError."""
    if dist.get_world_size(group) == 1:  # a sum (or max) over one rank is the identity
        return
    try:
        dist.all_reduce(buf, op=op, group=group)
    except RuntimeError as e:
        raise DistributedError(
            f"rank {dist.get_rank(group)}: {what} failed; another rank probably raised, exited or "
            f"timed out (see its traceback). Backend said: {e}"
        ) from e


def _sum_leaves(group: Any, xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """All-reduce (sum) several tensors with one collective per (dtype, device) bucket."""
    out: list[torch.Tensor | None] = [None] * len(xs)
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, x in enumerate(xs):
        buckets.setdefault((x.dtype, x.device), []).append(i)
    for idx in buckets.values():
        buf = torch.cat([xs[i].reshape(-1) for i in idx])  # a fresh contiguous copy
        _all_reduce(buf, dist.ReduceOp.SUM, group)
        for i, part in zip(idx, torch.split(buf, [xs[i].numel() for i in idx])):
            out[i] = part.reshape(xs[i].shape)
    return tuple(out)  # type: ignore[arg-type]


class _Replicate(torch.autograd.Function):
    """Identity forward; all-reduce of the cotangents backward (as ``_Reduce``)."""

    @staticmethod
    def forward(group: Any, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        need = [i for i, g in enumerate(ctx.needs_input_grad[1:]) if g]
        out: list[torch.Tensor | None] = [None] * len(grads)
        if need:  # only the cotangents autograd asked for travel
            for i, r in zip(need, _Reduce.apply(ctx.group, *(grads[i] for i in need))):
                out[i] = r
        return (None, *out)

    @staticmethod
    def jvp(ctx: Any, group_t: Any, *tangents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.view_as(t) for t in tangents)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], group: Any, *xs: torch.Tensor):
        return tuple(x.view_as(x) for x in xs), tuple(in_dims[1:])


class _Reduce(torch.autograd.Function):
    """All-reduce (sum) forward; ``_Replicate`` backward (a replicated cotangent stays)."""

    @staticmethod
    def forward(group: Any, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _sum_leaves(group, xs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        return (None, *_Replicate.apply(ctx.group, *grads))

    @staticmethod
    def jvp(ctx: Any, group_t: Any, *tangents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _Reduce.apply(ctx.group, *tangents)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], group: Any, *xs: torch.Tensor):
        # The sum is elementwise, so the batched (physical) tensors are reduced as they are;
        # every rank runs the same program, hence has the same batch layout.
        return _sum_leaves(group, xs), tuple(in_dims[1:])


def _require_group(group: Any) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group"
            "(backend) first (launch with torchrun, or set MASTER_ADDR/MASTER_PORT/RANK/"
            "WORLD_SIZE), then wrap the losses with data_parallel."
        )


def _checksum(leaves: Leaves) -> float:
    """Σ x + Σ x² over the replicated inputs; 0 where the data cannot be read (vmap).

    Every rank runs the same program, so every rank can or cannot read its data alike.
    """
    try:
        return sum(float(t.detach().double().sum() + (t.detach().double() ** 2).sum()) for t in leaves)
    except RuntimeError:
        return 0.0


def _gather(group: Any, device: torch.device, row: Sequence[float]) -> list[list[float]]:
    """Every rank's ``row`` on every rank, with one all-reduce (sum).

    Each rank writes its row into its own slot of a zero buffer, so the sum is exact (no
    rounding).  Not ``all_gather_object``: it slices tensors, which fails inside
    ``torch.func`` transforms, and it costs two collectives.
    """
    world, rank, k = dist.get_world_size(group), dist.get_rank(group), len(row)
    flat = [0.0] * (world * k)
    flat[rank * k:(rank + 1) * k] = row
    buf = torch.tensor(flat, dtype=torch.float64, device=device)
    _all_reduce(buf, dist.ReduceOp.SUM, group, "the consistency all-reduce of data_parallel")
    vals = buf.tolist()
    return [vals[r * k:(r + 1) * k] for r in range(world)]


_MESSAGE_BYTES = 400


def _agree(group: Any, device: torch.device, failed: BaseException | None,
           checksum: float, numel: int, n_local: int) -> int:
    """One small all-reduce so that every rank takes the same decision; returns N = Σ n_r.

    Stops every rank — the failing one with its own exception, the others with a
    :class:`DistributedError` that quotes it — when one raised in its local function,
    when the replicated inputs differ across ranks (params/hparams out of sync), when the
    outputs have different sizes (the value all-reduce would mix unrelated numbers or
    hang), or when a rank has no samples.
    """
    rank = dist.get_rank(group)
    rows = _gather(group, device, [float(failed is not None), checksum, float(numel), float(n_local)])
    if any(r[0] for r in rows):
        raw = b"" if failed is None else f"{type(failed).__name__}: {failed}".encode()[:_MESSAGE_BYTES]
        codes = [float(b) for b in raw] + [0.0] * (_MESSAGE_BYTES - len(raw))
        msgs = [bytes(int(b) for b in m).rstrip(b"\0").decode(errors="replace")
                for m in _gather(group, device, codes)]
        if failed is not None:
            raise failed
        who = "; ".join(f"rank {r} raised {m}" for r, m in enumerate(msgs) if m)
        raise DistributedError(f"data_parallel on rank {rank}: stopped because {who}.")
    sums = [r[1] for r in rows]
    lo, hi = min(sums), max(sums)
    if hi - lo > 1e-9 * max(1.0, abs(lo), abs(hi)):
        raise DistributedError(
            f"data_parallel on rank {rank}: params/hparams differ across ranks (checksums "
            f"from {lo:.17g} to {hi:.17g}); every rank must hold the same values. Start "
            "them from the same seed or broadcast them from rank 0 (torch.distributed."
            "broadcast), and update them only with all-reduced (hyper)gradients."
        )
    sizes = [int(r[2]) for r in rows]
    if len(set(sizes)) > 1:
        raise DistributedError(
            f"data_parallel on rank {rank}: the local function returns {numel} numbers here, "
            f"{sizes} across ranks; its output must have the same shapes on every rank (a "
            "mean over the shard, not one value per sample)."
        )
    counts = [int(r[3]) for r in rows]
    if min(counts) <= 0:
        raise ValueError(
            f"data_parallel on rank {rank}: rank(s) {[r for r, c in enumerate(counts) if c <= 0]} "
            f"hold no data (n_local per rank: {counts}); a mean over no samples is undefined. "
            "Give every rank at least one sample (bilevel.distributed.shard does) or run on "
            "fewer processes."
        )
    return sum(counts)


def data_parallel(
    local_fn: Callable[..., Any],
    n_local: int | Callable[..., int],
    *,
    group: Any = None,
) -> Callable[..., Any]:
    """The global ``fn(params, hparams, *args) = Σ_r (n_r/N)·local_fn_r(params, hparams, *args)``.

    ``local_fn`` computes, on this rank's ``n_local`` samples, a *mean* over them (a loss,
    or a fixed-point map / ITD step whose data term is a mean gradient), returning a tensor
    or a pytree of tensors; ``N = Σ_r n_r``.  The returned function gives the full-data
    value on every rank, and every derivative of it (``torch.func`` or autograd, any
    order, forward or reverse) is the full-data derivative, bitwise identical on every rank
    — so ``hypergrad`` (every solver), ``unroll`` (ITD), ``forward_hypergrad`` and anything
    else built on these functions equal the one-process result on all the data.  Shards
    may differ in size; terms that every rank adds alike (penalties) count once because
    the weights ``n_r/N`` sum to one.  For a loss that is a *sum* over data, pass
    ``local_sum / n_local`` and multiply the result by ``N``.

    ``n_local``: an int (a fixed shard), or a function of the extra ``*args`` giving the
    number of samples in them (a minibatch: ``lambda batch: len(batch[1])``), for the
    stochastic methods, whose functions take ``(params, hparams, batch)``.

    Each call is collective: make it on every rank of ``group`` (default: the world), after
    ``torch.distributed.init_process_group``.  One small all-reduce (4 numbers per rank)
    first checks that no rank raised in ``local_fn`` (otherwise every rank raises — the
    failing one its own error, the others a :class:`DistributedError` quoting it — instead
    of hanging), that ``params`` and ``hparams`` agree across ranks, that the outputs have
    one size and that no shard is empty (its answer is read on the host: one sync per call
    on a GPU); one all-reduce then sums the weighted outputs.
    Each derivative all-reduces the cotangents of ``params`` (and of ``hparams`` when it
    is differentiated): one all-reduce of ``|params|`` numbers per Hessian– or
    Jacobian–vector product.
    """
    _require_group(group)
    if not callable(local_fn):
        raise TypeError(f"data_parallel: local_fn should be a function (params, hparams, ...), not {local_fn!r}.")
    if not callable(n_local):
        _check_count(n_local)
    nccl = dist.get_backend(group) == "nccl"

    def fn(params: Any, hparams: Any, *args: Any) -> Any:
        wl, wspec = T.tree_flatten(params)
        ll, lspec = T.tree_flatten(hparams)
        inputs = [t for t in wl + ll if isinstance(t, torch.Tensor)]
        if not inputs:
            raise TypeError("params and hparams hold no tensors; data_parallel needs them as tensors.")
        reps = iter(_Replicate.apply(group, *inputs))
        wl = [next(reps) if isinstance(t, torch.Tensor) else t for t in wl]
        ll = [next(reps) if isinstance(t, torch.Tensor) else t for t in ll]
        device = inputs[0].device
        # the small control all-reduce goes where the backend can take it
        control = torch.device("cuda", torch.cuda.current_device()) if nccl and device.type != "cuda" else device
        failed: BaseException | None = None
        out, ospec, numel, n = [], None, -1, 0
        try:
            if nccl and device.type != "cuda":
                raise TypeError(
                    f"the NCCL backend all-reduces CUDA tensors, but params/hparams are on {device}: "
                    "move them and the data to this rank's GPU, or use the gloo backend on CPU."
                )
            n = _check_count(n_local(*args)) if callable(n_local) else n_local
            out, ospec = T.tree_flatten(local_fn(T.tree_unflatten(wl, wspec), T.tree_unflatten(ll, lspec), *args))
            if not out or not all(isinstance(o, torch.Tensor) for o in out):
                raise TypeError(
                    "local_fn should return a tensor or a pytree of tensors, got "
                    f"{T.describe(T.tree_unflatten(out, ospec))}."
                )
            numel = sum(o.numel() for o in out)
        except Exception as e:  # told to every rank in _agree, so that no rank waits forever
            failed = e
        total = _agree(group, control, failed, _checksum(inputs), numel, n)
        weight = n / total
        return T.tree_unflatten(list(_Reduce.apply(group, *(weight * o for o in out))), ospec)

    return fn


def _check_count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n_local should be the number of samples on this rank (an int >= 0), not {n!r}.")
    return n


def shard(*tensors: torch.Tensor, group: Any = None) -> Any:
    """This rank's contiguous block of rows (dim 0) of each tensor.

    The blocks follow the rank order; the first ``n % R`` of the ``R`` ranks get
    ``⌈n/R⌉`` rows and the others ``⌊n/R⌋``.  Returns a tensor for one argument, else a
    tuple.  Not a collective.
    """
    _require_group(group)
    if not tensors:
        raise ValueError("shard needs at least one tensor.")
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError(f"shard: tensors should share dim 0, got {[t.shape[0] for t in tensors]}.")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    out = tuple(t[start:stop] for t in tensors)
    return out[0] if len(out) == 1 else out

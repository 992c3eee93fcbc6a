"""Arithmetic on pytrees of tensors.

The solvers work on *flat lists of leaves* (what ``tree_flatten`` returns) so that one
``torch._foreach_*`` call updates every leaf at once; the public functions flatten at the
boundary and unflatten the result.  Nothing here syncs with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

try:  # which torch.func transforms are active (private functorch hook, as in bilevel._checks)
    from torch._C._functorch import peek_interpreter_stack as _peek_interpreter_stack
except ImportError:  # pragma: no cover
    _peek_interpreter_stack = None

__all__ = [
    "tree_flatten",
    "tree_unflatten",
    "tree_map",
    "add",
    "sub",
    "axpy",
    "scale",
    "vdot",
    "norm",
    "zeros_like",
    "describe",
]

Leaves = list[torch.Tensor]


def add(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Leaves:
    """x + y, leaf by leaf."""
    if not _transformed():  # _foreach_* has no batching rule under torch.func.vmap (raising costs more than a loop)
        try:
            return list(torch._foreach_add(list(x), list(y)))
        except RuntimeError:
            pass
    return [xi + yi for xi, yi in zip(x, y)]


def sub(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Leaves:
    """x - y, leaf by leaf."""
    if not _transformed():
        try:
            return list(torch._foreach_sub(list(x), list(y)))
        except RuntimeError:
            pass
    return [xi - yi for xi, yi in zip(x, y)]


def axpy(a: torch.Tensor | float, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Leaves:
    """a * x + y, with ``a`` a scalar (a 0-d tensor stays on the device: no host sync)."""
    if isinstance(a, torch.Tensor):  # one fused kernel per leaf (y + a*x is two, and two dispatches under vmap)
        return [torch.addcmul(yi, a, xi) for xi, yi in zip(x, y)]
    if len(x) > 1 and not _transformed():  # one foreach op; one leaf: torch.add is cheaper to launch
        try:
            return list(torch._foreach_add(list(y), list(x), alpha=a))
        except RuntimeError:
            pass
    return [torch.add(yi, xi, alpha=a) for xi, yi in zip(x, y)]


def scale(a: torch.Tensor | float, x: Sequence[torch.Tensor]) -> Leaves:
    """a * x."""
    if isinstance(a, torch.Tensor):
        return [a * xi for xi in x]
    if not _transformed():
        try:
            return list(torch._foreach_mul(list(x), a))
        except RuntimeError:
            pass
    return [a * xi for xi in x]


def vdot(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> torch.Tensor:
    """<x, y> summed over all leaves, a 0-d tensor."""
    if _transformed():
        # under torch.func.vmap, torch.dot's batching rule costs ~3x a multiply and a sum
        # (and adding up its outputs ~4x adding sums): a Krylov solve pays it every iteration
        if len(x) == 1:
            return (x[0] * y[0]).sum()
        return sum((xi * yi).sum() for xi, yi in zip(x, y))  # type: ignore[return-value]
    # torch.dot on flat views: one kernel, no x*y temporary
    if len(x) == 1:
        return torch.dot(_flat(x[0]), _flat(y[0]))
    return sum(torch.dot(_flat(xi), _flat(yi)) for xi, yi in zip(x, y))  # type: ignore[return-value]


def _transformed() -> bool:
    """A torch.func transform (vmap, grad, jvp) is active."""
    return _peek_interpreter_stack is not None and _peek_interpreter_stack() is not None


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 1 else t.reshape(-1)


def norm(x: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm over all leaves, a 0-d tensor."""
    if len(x) == 1:
        return torch.linalg.vector_norm(x[0])
    if _transformed():  # under vmap one norm of the concatenation costs fewer dispatches than a norm per leaf
        return torch.linalg.vector_norm(torch.cat([xi.flatten() for xi in x]))
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(xi) for xi in x]))


def zeros_like(x: Sequence[torch.Tensor]) -> Leaves:
    return [torch.zeros_like(xi) for xi in x]


def flat_fn(fn: Callable[[Any], Any], spec: Any) -> Callable[[Leaves], Leaves]:
    """Wrap a pytree -> pytree function as a leaves -> leaves function."""

    def wrapped(leaves: Leaves) -> Leaves:
        return tree_flatten(fn(tree_unflatten(list(leaves), spec)))[0]

    return wrapped


def describe(tree: Any) -> str:
    """Short human-readable structure of a pytree, containers included, for error messages:
    ``tuple(2 leaves: [(3,):float64, (2,):float64])`` differs from the same leaves in a list."""
    leaves, spec = tree_flatten(tree)
    shapes = ", ".join(
        f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor)
        else type(t).__name__
        for t in leaves
    )
    if spec.num_children == 0 and len(leaves) == 1:
        return f"a tensor [{shapes}]" if isinstance(tree, torch.Tensor) else f"1 leaf [{shapes}]"
    return f"{_containers(spec)} with {len(leaves)} leaves [{shapes}]"


def _containers(spec: Any) -> str:
    """The container skeleton of a spec: ``tuple(*, list[*, *])``, dict keys named."""
    if spec.num_children == 0:
        return "*"
    kind = getattr(spec.type, "__name__", str(spec.type))
    kids = [_containers(c) for c in spec.children()]
    if spec.type is dict:
        return "dict{" + ", ".join(f"{k!r}: {c}" for k, c in zip(spec.context, kids)) + "}"
    return f"{kind}(" + ", ".join(kids) + ")"

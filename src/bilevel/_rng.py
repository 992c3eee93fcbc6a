"""Random-generator state, captured and replayed: a recomputation (checkpointed ITD) or a
side computation (a structural check that calls a user's step again) must draw the same
random numbers as the run it repeats, and leave the caller's stream as it found it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

Leaves = list[torch.Tensor]


def capture(tensors: Leaves) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    """The CPU generator's state, and the CUDA generators' of the devices of ``tensors``
    (and the current one) when CUDA is initialised — as torch.utils.checkpoint's
    ``preserve_rng_state``."""
    devices: list[int] = []
    if torch.cuda.is_initialized():
        devices = sorted({t.get_device() for t in tensors if t.is_cuda} | {torch.cuda.current_device()})
    return torch.get_rng_state(), devices, [torch.cuda.get_rng_state(d) for d in devices]


@contextlib.contextmanager
def replayed(saved: tuple[torch.Tensor, list[int], list[torch.Tensor]]) -> Iterator[None]:
    """Run the block with the generators as :func:`capture` saw them; restore the
    current states afterwards (the recomputation leaves the caller's random stream alone)."""
    cpu, devices, states = saved
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.set_rng_state(cpu)
        for d, state in zip(devices, states):
            torch.cuda.set_rng_state(state, d)
        yield

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# modules written with float64 as the default dtype; every other test sees torch's float32
FLOAT64_MODULES = {"test_nonsmooth", "test_prox"}


@pytest.fixture(autouse=True, scope="module")
def _default_dtype(request):
    # explicit per test: a module that sets the default at import must not leak it
    module = request.module.__name__.split(".")[-1]
    torch.set_default_dtype(torch.float64 if module in FLOAT64_MODULES else torch.float32)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny problems: one thread is fastest, and several spin-wait badly on a shared machine."""
    from bilevel.apps._runs import one_thread as single

    with single():
        yield


@pytest.fixture
def killed_at(monkeypatch):
    """``killed_at(module, name, n)``: the n-th call of ``module.name`` raises KeyboardInterrupt,
    as a kill in the middle of a run would; returns ``revive()``, which puts the real one back."""

    def kill(module, name, n):
        real, calls = getattr(module, name), [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, dying)
        return lambda: monkeypatch.setattr(module, name, real)

    return kill

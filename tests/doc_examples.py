"""Code examples of the README and the documentation: extract, run, compare printed output.

The convention, in any Markdown file: every ```python block runs as written, in a fresh
namespace, from an empty temporary directory. When a block is followed by a line
``Output:`` and a ```text block, what the code prints must match that block: the words
exactly, every number within a relative 1e-3 or an absolute 1e-9 (so a residual printed as
3e-16 on one machine may read 5e-16 on another, but an iteration count may not change).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

_BLOCK = re.compile(r"^```python\n(.*?)^```\n(?:\nOutput:\n\n```text\n(.*?)^```\n)?", re.S | re.M)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    code: str
    expected: str | None  # the printed output the page shows, or None

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"


def examples(path: Path) -> list[Example]:
    """The ```python blocks of ``path`` with the output block that follows each, if any."""
    text = path.read_text(encoding="utf-8")
    return [Example(path, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def run(example: Example, workdir: Path) -> str:
    """Execute the example in ``workdir`` and return what it printed."""
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out):
            code = compile("\n" * (example.line) + example.code, str(example.path), "exec")
            # a real module, as a script's __main__ is: torch.compile looks its globals up by module name
            module = types.ModuleType("__example__")
            sys.modules["__example__"] = module
            exec(code, module.__dict__)
    finally:
        sys.modules.pop("__example__", None)
        os.chdir(cwd)
    return out.getvalue()


def _close(a: str, b: str) -> bool:
    x, y = float(a), float(b)
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return x == y or abs(x - y) <= max(1e-9, 1e-3 * max(abs(x), abs(y)))


def mismatch(printed: str, expected: str) -> str | None:
    """None when ``printed`` matches ``expected`` (numbers within tolerance), else why not."""
    got_words, want_words = _NUMBER.split(printed.strip()), _NUMBER.split(expected.strip())
    got_nums, want_nums = _NUMBER.findall(printed.strip()), _NUMBER.findall(expected.strip())
    if got_words != want_words or len(got_nums) != len(want_nums):
        return f"printed:\n{printed}\nthe page says:\n{expected}"
    for g, w in zip(got_nums, want_nums):
        if not _close(g, w):
            return f"printed {g} where the page says {w}:\n{printed}"
    return None

"""Every ```python block of the README runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def test_readme_opens_with_the_two_commands():
    head = README.read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head


# a python block followed by "prints" and a plain block: its output must be exactly that
PRINTED = re.findall(r"```python\n((?:(?!```).)*?)```\n\nprints\n\n```\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code,expected", PRINTED, ids=[f"printed{i}" for i in range(len(PRINTED))])
def test_readme_block_prints_what_the_readme_says(code, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out == expected

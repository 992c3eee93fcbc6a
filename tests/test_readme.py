"""The README: short, for users, every example runs and prints what it shows, its links exist."""

import re
from pathlib import Path

import pytest
from doc_examples import examples, mismatch, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny examples: one thread is fastest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
EXAMPLES = examples(README)


def _section(title: str) -> str:
    parts = re.split(r"^## ", TEXT, flags=re.M)
    found = [p for p in parts if p.startswith(title + "\n")]
    assert found, f"README has no '## {title}' section"
    return found[0]


def test_readme_is_short():
    assert len(TEXT.splitlines()) <= 200


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_readme_example_prints_what_the_readme_shows(example, tmp_path):
    printed = run(example, tmp_path)
    if example.expected is not None:
        assert mismatch(printed, example.expected) is None, mismatch(printed, example.expected)


def test_quickstart_shows_its_output():
    quick = [e for e in EXAMPLES if e.code in _section("Quickstart")]
    assert quick and quick[0].expected, "the Quickstart example must be followed by its Output block"
    assert len(quick[0].code.splitlines()) <= 20


def test_develop_section_near_the_top_opens_with_the_two_commands():
    develop = _section("Develop")
    first_block = re.search(r"```bash\n(.*?)```", develop, flags=re.S).group(1).splitlines()
    assert first_block[0].startswith("make demo") and first_block[1].startswith("make test")
    assert TEXT.index("## Develop") < TEXT.index("## Quickstart")


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "docs"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"Makefile has no target {target}"


def test_relative_links_exist():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def _results_rows() -> list[list[str]]:
    rows = [r for r in _section("Results").splitlines() if r.startswith("|")][2:]  # no header, no rule
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows]


def test_results_rows_name_registered_jobs_and_their_commands():
    from bilevel.cli import JOBS

    rows = _results_rows()
    assert rows
    for cells in rows:
        assert len(cells) == 4, f"a Results row has 4 cells (job | command | headline | time): {cells}"
        job = re.sub(r"\[([^\]]+)\]\(.*\)", r"\1", cells[0])
        assert job in JOBS, f"Results row for {job!r}, which `bilevel --help` does not list"
        assert f"bilevel run {job}" in cells[1] or (job == "ho-digits" and "bilevel demo" in cells[1])


def test_every_registered_job_has_a_results_row():
    from bilevel.cli import JOBS

    documented = {re.sub(r"\[([^\]]+)\]\(.*\)", r"\1", cells[0]) for cells in _results_rows()}
    missing = sorted(set(JOBS) - documented)
    assert not missing, f"add a row to the README's Results table (job | command | headline | time) for: {missing}"


def test_gpu_status_is_stated():
    assert "GPU" in _section("Results")

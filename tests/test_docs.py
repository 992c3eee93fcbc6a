"""The documentation: every example runs and prints what its page shows, the API reference
covers every public name, and no page speaks of internal matters."""

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
from doc_examples import examples, mismatch, run

import bilevel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny examples: one thread is fastest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
EXAMPLES = [e for page in PAGES for e in examples(page)]


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"{e.path.relative_to(DOCS)}:{e.line}" for e in EXAMPLES])
def test_example_prints_what_the_page_shows(example, tmp_path):
    printed = run(example, tmp_path)
    if example.expected is not None:
        assert mismatch(printed, example.expected) is None, mismatch(printed, example.expected)


def test_output_blocks_follow_an_example():
    # an "Output:" whose block the extractor does not attach to code would never be checked
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        attached = sum(e.expected is not None for e in examples(page))
        assert text.count("\nOutput:\n") == attached, f"{page}: an Output: block not right after a ```python block"


# --- API reference ---------------------------------------------------------------

def _directives() -> list[tuple[str, bool]]:
    """(path, renders its members) for every `::: path` in docs/api."""
    found = []
    for page in sorted((DOCS / "api").glob("*.md")):
        for m in re.finditer(r"^::: ([\w.]+)\n((?:[ \t]+.*\n)*)", page.read_text(encoding="utf-8") + "\n", flags=re.M):
            found.append((m.group(1), "members: false" not in m.group(2)))
    return found


def _resolve(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def _documented() -> set[int]:
    ids = set()
    for path, members in _directives():
        obj = _resolve(path)
        ids.add(id(obj))
        if members and hasattr(obj, "__all__") and type(obj).__name__ == "module":
            ids.update(id(getattr(obj, n)) for n in obj.__all__)
    return ids


def _public_modules() -> list[str]:
    skip = {"cli", "apps"}
    return [m.name for m in pkgutil.iter_modules(bilevel.__path__) if not m.name.startswith("_") and m.name not in skip]


def test_api_reference_covers_every_public_name():
    documented = _documented()
    missing = [f"bilevel.{n}" for n in bilevel.__all__ if id(getattr(bilevel, n)) not in documented]
    for mod in _public_modules():
        module = importlib.import_module(f"bilevel.{mod}")
        names = getattr(module, "__all__", None)
        assert names is not None, f"bilevel.{mod} has no __all__: say which of its names are public"
        missing += [f"bilevel.{mod}.{n}" for n in names if id(getattr(module, n)) not in documented]
    assert not missing, f"add `::: NAME` to a page of docs/api for: {missing}"


def test_api_pages_are_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (DOCS / "api").glob("*.md"):
        assert f"api/{page.name}" in nav


# --- words for users -------------------------------------------------------------

INTERNAL = re.compile(r"\bissue \d+|\btarget (is )?missed|\bto be filled|\bsession\b|\bhelper\b|\bTODO\b", re.I)


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_internal_references(page):
    hits = [line for line in page.read_text(encoding="utf-8").splitlines() if INTERNAL.search(line)]
    assert not hits, f"{page.name} speaks of internal matters: {hits}"


def test_readme_sections_included_by_the_site_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES:
        for name in re.findall(r'^--8<-- "README\.md:([\w-]+)"', page.read_text(encoding="utf-8"), flags=re.M):
            assert f"<!-- --8<-- [start:{name}] -->" in readme and f"<!-- --8<-- [end:{name}] -->" in readme, (
                f"{page.name} includes README section {name!r}, which the README does not mark"
            )

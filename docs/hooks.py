"""MkDocs hook: a page includes sections of the README, so the README stays their one source.

A line ``--8<-- "README.md:NAME"`` in a page is replaced by the README's text between
``<!-- --8<-- [start:NAME] -->`` and ``<!-- --8<-- [end:NAME] -->``; the README's links
into ``docs/`` are rewritten relative to the including page. An unknown section is an error.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

_INCLUDE = re.compile(r'^--8<-- "README\.md:([\w-]+)"[ \t]*$', re.M)
_DOCS_LINK = re.compile(r"\]\(docs/([^)\s]*)\)")


def readme_section(readme: str, name: str) -> str:
    start, end = f"<!-- --8<-- [start:{name}] -->", f"<!-- --8<-- [end:{name}] -->"
    if start not in readme or end not in readme:
        raise ValueError(f"README.md has no section {name!r} (markers {start} ... {end})")
    return readme.split(start, 1)[1].split(end, 1)[0].strip("\n")


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    readme = (Path(config.config_file_path).parent / "README.md").read_text(encoding="utf-8")
    here = posixpath.dirname(page.file.src_uri) or "."

    def relink(match: re.Match) -> str:
        return "](" + posixpath.relpath(match.group(1), here) + ")"

    return _INCLUDE.sub(lambda m: _DOCS_LINK.sub(relink, readme_section(readme, m.group(1))), markdown)

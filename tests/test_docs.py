"""The code blocks of the docs pages and the README run as they stand.

Every ```python block of a page is executed in order, in one namespace per page, so a page
that stops matching the library fails here rather than in a reader's hands.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_the_pages_have_code():
    with_code = [page.name for page in PAGES if python_blocks(page)]
    assert {"getting_started.md", "coming_from.md", "README.md"} <= set(with_code)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_page_code_runs(page, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    namespace = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(python_blocks(page)):
        code = compile(block, f"{page.name}, python block {number}", "exec")
        exec(code, namespace)

"""The Python blocks of README.md and docs/*.md run as they are written.

Each file's ```python blocks run in order in one fresh namespace (a block may build on the
ones before it), on CPU, in a temporary working directory (whatever a block writes lands
there). A block that needs what a quick test cannot give (a trainer, several processes, a
GPU, a download, long training) carries the comment ``<!-- not run -->`` on the line
before its opening fence, and is skipped; docs/guide.md says so in its introduction.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_RUN = "<!-- not run -->"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(text: str):
    """``(line, code, runs)`` of each ```python block, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1), before != NOT_RUN))
    return blocks


def test_blocks_are_found_and_the_marker_skips_one():
    text = "a\n```python\nx = 1\n```\n<!-- not run -->\n```python\nraise SystemExit\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n", True), (6, "raise SystemExit\n", False)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_python_blocks_run(document, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for line, code, runs in python_blocks(document.read_text(encoding="utf-8")):
        if not runs:
            continue
        try:
            exec(compile(code, f"{document.name}:{line}", "exec"), namespace)
        except Exception as error:  # name the block that failed
            raise AssertionError(f"{document.name}, block at line {line}: {error!r}") from error


def test_the_readme_and_guide_have_blocks_that_run():
    for name in ["README.md", "docs/guide.md"]:
        blocks = python_blocks((ROOT / name).read_text(encoding="utf-8"))
        assert any(runs for _, _, runs in blocks), name

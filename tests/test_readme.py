"""Every ```python block of README.md runs as written.

The convention (also stated in README.md, "README code blocks"):

* each fenced ```python block is executed on CPU in a fresh namespace, so it must be complete
  (its own imports, its own inputs) and small;
* a block preceded by the line ``<!-- readme: no-run (reason) -->`` (blank lines in between
  allowed) is only compiled, for blocks that need a download, a GPU or several processes.
  The reason is required;
* a block whose ``import`` of transformers or safetensors fails is skipped, naming the package.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_NO_RUN = re.compile(r"^<!--\s*readme:\s*no-run\s*\((?P<reason>[^)]*)\)\s*-->\s*$")
_MARKER = re.compile(r"^<!--\s*readme:")


class Block(NamedTuple):
    line: int  # 1-based line of the opening fence
    source: str
    no_run: str  # the reason, or "" when the block runs


def readme_blocks(text: str) -> List[Block]:
    """The ```python blocks of ``text``, with their no-run reasons; raises ValueError on a
    malformed ``<!-- readme: ... -->`` marker, a marker that no python block follows, or an
    unclosed fence."""
    lines = text.splitlines()
    blocks: List[Block] = []
    pending = None  # (line, reason) of a no-run marker waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        if _MARKER.match(line.strip()):
            m = _NO_RUN.match(line.strip())
            if m is None or not m.group("reason").strip():
                raise ValueError(f"README.md:{i + 1}: malformed marker {line.strip()!r}; "
                                 "allowed: '<!-- readme: no-run (reason) -->' with a non-empty reason")
            pending = (i + 1, m.group("reason").strip())
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence is None:
            if line.strip() and pending is not None:
                raise ValueError(f"README.md:{pending[0]}: a no-run marker must be followed by a ```python block")
            i += 1
            continue
        indent, lang = fence.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{i + 1}: code fence is never closed")
        if lang == "python":
            body = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:end])
            blocks.append(Block(i + 1, body + "\n", pending[1] if pending else ""))
        elif pending is not None:
            raise ValueError(f"README.md:{pending[0]}: a no-run marker must be followed by a ```python "
                             f"block, got a ```{lang} block")
        pending = None
        i = end + 1
    if pending is not None:
        raise ValueError(f"README.md:{pending[0]}: a no-run marker must be followed by a ```python block")
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def _id(block: Block) -> str:
    return f"line{block.line}" + ("-no-run" if block.no_run else "")


def test_readme_has_runnable_blocks():
    assert any(not b.no_run for b in BLOCKS), "README.md has no ```python block that runs"


@pytest.mark.parametrize("block", BLOCKS, ids=[_id(b) for b in BLOCKS])
def test_readme_block(block: Block, monkeypatch):
    code = compile(block.source, f"README.md:{block.line}", "exec")
    if block.no_run:
        return  # compiled above: syntax only, for the reason given in the marker
    monkeypatch.setattr(sys, "argv", ["README.md"])
    namespace = {"__name__": "__readme__"}
    with torch.random.fork_rng():
        try:
            exec(code, namespace)  # noqa: S102 - the README's own code, as a reader would run it
        except ModuleNotFoundError as exc:  # a block about the Hugging Face integration, without transformers
            if (exc.name or "").split(".")[0] in OPTIONAL_PACKAGES:
                pytest.skip(f"this block needs {exc.name}, which is not installed (the test command installs it)")
            raise


OPTIONAL_PACKAGES = ("transformers", "safetensors")


OUTSIDE_DOCUMENTS = ("DESIGN" + ".md", "../" + "shared")  # spelled apart so this file does not cite them


def test_cited_documents_are_in_the_repository():
    """Code and docs cite documents inside the repository only: docs/ARCHITECTURE.md holds the
    design, and no file names the design notes or the shared folder outside the checkout."""
    root = README.parent
    files = [f for pattern in ("*.md", "*.py", "*.sh") for f in root.rglob(pattern)
             if not any(part.startswith(".") or part in ("build", "__pycache__") for part in f.relative_to(root).parts)]
    assert (root / "docs" / "ARCHITECTURE.md").is_file()
    stale = [f"{f.relative_to(root)}:{i}" for f in files
             for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if any(name in line for name in OUTSIDE_DOCUMENTS)]
    assert not stale, f"cites a document outside the repository: {stale}"


# ---- the parser itself ---------------------------------------------------------------------------


def test_parser_reads_markers_and_fences():
    text = ("intro\n```python\nx = 1\n```\n\n<!-- readme: no-run (needs a GPU) -->\n\n"
            "```python\ny = 2\n```\n```bash\nls\n```\n  ```python\n  z = 3\n  ```\n")
    got = readme_blocks(text)
    assert [(b.line, b.source, b.no_run) for b in got] == [
        (2, "x = 1\n", ""), (8, "y = 2\n", "needs a GPU"), (14, "z = 3\n", "")]


@pytest.mark.parametrize("text, match", [
    ("<!-- readme: no-run () -->\n```python\nx\n```\n", "malformed marker"),
    ("<!-- readme: skip (why) -->\n```python\nx\n```\n", "malformed marker"),
    ("<!-- readme: no-run (why) -->\nsome prose\n```python\nx\n```\n", "must be followed"),
    ("<!-- readme: no-run (why) -->\n```bash\nls\n```\n", "got a ```bash block"),
    ("<!-- readme: no-run (why) -->\n", "must be followed"),
    ("```python\nx = 1\n", "never closed"),
])
def test_parser_rejects_bad_markers(text, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        readme_blocks(text)

"""run.sh's help (no set-up needed) and CI running exactly the README's test command."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="run.sh needs bash")


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_lists_commands_options_and_environment(flag):
    res = subprocess.run(["bash", str(ROOT / "run.sh"), flag], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for word in ("demo", "test", "bench", "setup", "--quick", "--out", "--budget-s",
                 "PYTHON=", "MAX_JOBS=", "LHATTN_REBUILD=", "LHATTN_FORCE_CPU=", "TRITON_INTERPRET="):
        assert word in res.stdout, f"./run.sh {flag} does not mention {word!r}:\n{res.stdout}"
    assert "[run.sh]" not in res.stdout, "help must not run the set-up"


def test_unknown_command_fails_with_usage():
    res = subprocess.run(["bash", str(ROOT / "run.sh"), "nonsense"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "unknown command nonsense" in res.stderr and "usage:" in res.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_bash = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_bash.splitlines()]
    assert "./run.sh test" in commands, f"README's first bash block has no './run.sh test':\n{first_bash}"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^exec \./run\.sh test\s*$", ci, re.M), f".ci/run does not run './run.sh test':\n{ci}"

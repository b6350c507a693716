"""The README's Quick start is a contract: exactly two command lines in one fenced block, the
first runs `parity report`, the second the tests; CI runs that same test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S)
    assert block, "no fenced block under ## Quick start"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def test_quick_start_has_exactly_two_lines():
    lines = quick_start_lines()
    assert len(lines) == 2, lines
    assert lines[0].rstrip().endswith("parity report")
    assert "pytest" in lines[1]


def test_ci_runs_the_readme_test_command():
    test_cmd = quick_start_lines()[1].split("&& ", 3)[-1]  # after venv creation and activation
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci, f"{test_cmd!r} not in .ci/run"

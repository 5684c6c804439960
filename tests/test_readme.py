"""The README's quick start is what CI runs: two lines, the second one verbatim in .ci/run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```(?:bash|sh)\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_lines_and_ci_runs_the_test_line():
    lines = quick_start_lines()
    assert len(lines) == 2
    main, tests = lines
    assert "python azr_mini.py" in main and "pip install" in main
    assert "pytest" in tests and "pip install" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci

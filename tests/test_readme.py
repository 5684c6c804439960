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


def test_ci_builds_its_own_environment_before_the_test_line():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    venv = next(k for k, line in enumerate(ci) if "-m venv" in line)
    activate = next(k for k, line in enumerate(ci) if "bin/activate" in line)
    assert venv < activate < ci.index(quick_start_lines()[1])


def requirement_lines(name: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return [line for line in lines if line]


def test_every_requirement_is_pinned_in_constraints():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in requirement_lines("constraints.txt"):
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
    assert "-c constraints.txt" in requirement_lines("requirements.txt")
    for file in ("requirements.txt", "requirements-dev.txt"):
        for line in requirement_lines(file):
            if line.startswith("-"):
                continue
            req = Requirement(line)
            if req.name == "torch":
                continue  # pinned by the README's install line (or the user's CUDA build)
            pin = pins.get(canonicalize_name(req.name))
            assert pin is not None and req.specifier.contains(pin), f"{req} is not pinned in constraints.txt"

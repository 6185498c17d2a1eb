"""The project's promises about itself: the README's commands and CI agree."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _readme_commands():
    block = re.search(r"```bash\n(.*?)```", _read("README.md"), re.S)
    assert block, "README.md must open with a bash block of commands"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_install_and_test_commands():
    commands = _readme_commands()
    assert any("pip install -r requirements.txt" in c for c in commands)
    assert any("pytest" in c for c in commands)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    ci_lines = [line.strip() for line in _read(".ci/run").splitlines()]
    assert test_command.strip() in ci_lines
    assert "pip install -q -r requirements.txt" in _read(".ci/run")

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


def test_readme_python_example_runs():
    """The README's sampling example, shrunk to a tiny model and 5 steps, runs as written."""
    import numpy as np

    block = re.search(r"```python\n(.*?)```", _read("README.md"), re.S).group(1)
    assert "hidden_size=384, depth=12, num_heads=6" in block and '"50"' in block
    block = block.replace("hidden_size=384, depth=12, num_heads=6", "hidden_size=32, depth=2, num_heads=2")
    namespace = {}
    exec(block.replace('"50"', '"5"'), namespace)
    video, image = namespace["video"], namespace["image"]
    assert video.shape == (1, 16, 32, 32, 4)
    np.testing.assert_array_equal(np.asarray(video[:, 0]), np.asarray(image))

"""The README's runnable examples (```python blocks) run as written and what they assert holds.

Illustrative snippets that need outside resources (a Dask scheduler, remote storage) are fenced as ```py.
"""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert BLOCKS, "README.md should show the NumPy example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    namespace = {}
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)


def test_readme_test_command_is_what_ci_runs():
    command = "python3 -m pip install tox && python3 -m tox"
    readme_lines = [line.split("#")[0].strip() for line in README.read_text().splitlines()]
    ci_lines = [line.strip() for line in (README.parent / ".ci" / "run").read_text().splitlines()]
    assert command in readme_lines
    assert command in ci_lines

"""The README's runnable examples (```python blocks) run as written and what they assert holds.

Illustrative snippets that need outside resources (a Dask scheduler, remote storage) are fenced as ```py.
"""
import ast
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


def _anchor(heading):
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_readme_contents_follow_the_two_commands_and_resolve():
    text = README.read_text()
    contents = text.index("## Contents")
    assert text.index("python3 -m tox -e bench") < contents and text.index("python3 -m pip install tox && "
                                                                            "python3 -m tox ") < contents
    assert contents < min(m.start() for m in re.finditer(r"^## (?!Contents)", text, flags=re.M))
    anchors = {_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", text, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links and set(links) <= anchors, set(links) - anchors


def test_readme_links_to_files_that_exist():
    """Every relative link points to a file of the checkout, except the benchmark page, which a run writes."""
    from benchmarks import report

    text = README.read_text()
    targets = {link.split("#")[0] for link in re.findall(r"\]\(([^)#][^)]*)\)", text) if "://" not in link}
    assert "docs/benchmarks.md" in targets and "docs/tuning.md" in targets and "DEVELOPERS.md" in targets
    root = README.parent
    assert str(root / "docs" / "benchmarks.md") == report.MARKDOWN_PAGE
    assert all((root / t).exists() for t in targets - {"docs/benchmarks.md"}), targets
    # the page is absent until a run writes it: the README says which command does
    start = text.index("**Results: [docs/benchmarks.md]")
    paragraph = text[start:text.index("\n\n", start)]
    assert "writes that page" in paragraph and "tox -e bench" in paragraph


def _public_names(module_path):
    tree = ast.parse((README.parent / module_path).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{module_path} has no __all__")


@pytest.mark.parametrize("module_path", ["nbconv/__init__.py", "nbconv/dask.py", "nbconv/cost.py",
                                         "keras_layers/__init__.py"])
def test_readme_api_table_names_every_public_name(module_path):
    text = README.read_text()
    api = text[text.index("## API"):text.index("## The first call")]
    missing = [name for name in _public_names(module_path) if not re.search(rf"\b{name}\b", api)]
    assert not missing, f"README's API section lacks {missing} of {module_path}"
    for command in ("info", "warmup", "bench"):
        assert f"python -m nbconv {command}" in api


def test_links_between_the_docs_resolve():
    """Links between README.md, DEVELOPERS.md and docs/*.md name files that exist and headings they have (the
    benchmark page is written by a run, so links to it are not followed)."""
    root = README.parent
    pages = [README, root / "DEVELOPERS.md", *sorted((root / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in link or link.startswith("mailto:"):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if target == (root / "docs" / "benchmarks.md").resolve():
                continue
            assert target.exists(), f"{page.name}: {link}"
            if anchor and target.suffix == ".md":
                headings = re.findall(r"^#{1,6} (.+)$", target.read_text(), flags=re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{page.name}: {link}"
            checked += 1
    assert checked > 20

"""The suite's shared helpers (tests/*_helpers.py) are imported as top-level modules, as pytest
puts tests/ (the rootdir conftest's folder) on sys.path: `from tolaria_helpers import ...`. An
import of `tests.X` resolves only when the working directory is on sys.path (`python -m pytest`),
so `pytest FILE` could not collect the module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_test_module_imports_the_tests_folder_as_a_package():
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.relative_to(TESTS)}:{node.lineno}: {name}" for name in names
                      if name == "tests" or name.startswith("tests.")]
    assert found == [], "import the helper by its own name (tests/ is on sys.path):\n" + \
        "\n".join(found)

"""Imports only go downward (DESIGN.md section 2); `esper --help` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Lower number = lower layer. A module may import its own package and anything in a lower
# layer; siblings in one layer never import each other.
LAYERS: dict[str, int] = {
    "esper.errors": 0, "esper._fs": 0,
    "esper.contracts": 1, "esper.signing": 1,
    "esper.workspace": 2,
    "esper.blueprints": 3, "esper.urza": 3, "esper.oona": 3,
    "kasmina": 4, "pipelines": 4, "esper.library": 4,
    "esper.tamiyo": 5, "esper.karn": 5, "esper.nissa": 5,
    # The trainer drives the controller; Simic trains its policies; the config composes all.
    "esper.tolaria": 6, "esper.simic": 6, "esper.config": 6,
    # The CLI: shared context and rendering, then the commands, then the root app.
    "esper_cli": 7, "commands": 8, "esper_cli.main": 9,
}


def _unit(module: str) -> str | None:
    """The layered unit a dotted module name belongs to (longest matching prefix)."""
    best = None
    for unit in LAYERS:
        if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best)):
            best = unit
    return best


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_every_source_file_is_in_a_layer():
    for top in ["esper", "kasmina", "pipelines", "commands", "esper_cli"]:
        for path in (ROOT / top).rglob("*.py"):
            name = _module_name(path)
            assert name == "esper" or _unit(name), f"{name} is in no layer; add it to LAYERS"


def test_imports_only_go_downward():
    violations = []
    for top in ["esper", "kasmina", "pipelines", "commands", "esper_cli"]:
        for path in (ROOT / top).rglob("*.py"):
            name = _module_name(path)
            if name == "esper":  # the SDK facade re-exports lazily from every layer
                continue
            unit = _unit(name)
            for imported in _imports(path):
                target = _unit(imported)
                if target is None or target == unit:
                    continue
                if LAYERS[target] >= LAYERS[unit]:
                    violations.append(f"{name} imports {imported} ({target} is not below {unit})")
    assert not violations, "\n".join(violations)


def test_cli_help_does_not_import_heavy_libraries():
    code = ("import sys; from esper_cli.main import app; "
            "heavy = [m for m in ('torch', 'triton', 'xgboost', 'torch_geometric', 'redis', "
            "'sqlite_utils', 'cryptography') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == "", f"importing the CLI pulled in: {out.stdout.strip()}"

"""The standard library: human-designed blueprints shipped as JSON in `library/`, one per file,
each file named after its blueprint. `esper library init` loads them into Urza."""

from __future__ import annotations

from functools import cache
from importlib import resources

from esper.blueprints.ir import BlueprintIR, load_ir


def standard_library() -> list[BlueprintIR]:
    """Every standard blueprint, ordered by name."""
    return list(_load())


@cache
def _load() -> tuple[BlueprintIR, ...]:
    folder = resources.files("esper.blueprints") / "library"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    return tuple(load_ir(f.read_bytes(), source=f"esper/blueprints/library/{f.name}") for f in files)

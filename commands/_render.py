"""Rich renderings shared by the commands: tables for lists, trees for records."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from esper_cli.context import out_console


def print_table(title: str, columns: list[str], rows: list[list[str]],
                wrap: tuple[str, ...] = ("tags",)) -> None:
    """Ids and names never wrap (they are copied and grepped); free text does."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column not in wrap)
    for row in rows:
        table.add_row(*row)
    out_console.print(table)


def blueprint_rows(blueprints) -> tuple[list[str], list[list[str]]]:
    columns = ["id", "name", "kind", "status", "origin", "interest"]
    rows = [[b.id[:12], b.name, b.interface_kind.value, b.status.value, b.origin,
             f"{b.tamiyo_interest:.2f}"] for b in blueprints]
    return columns, rows


def kernel_rows(kernels) -> tuple[list[str], list[list[str]]]:
    from esper.contracts import LATENCY_MS, MEMORY_MB

    columns = ["id", "status", "interface", "target", "dtype", "latency ms", "memory MB", "tags"]
    rows = []
    for k in kernels:
        bench = k.validation_report.benchmark_results if k.validation_report else {}
        rows.append([k.id, k.status.value, str(k.interface), k.target, k.dtype,
                     _number(bench.get(LATENCY_MS)), _number(bench.get(MEMORY_MB)),
                     ", ".join(k.tags)])
    return columns, rows


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def print_record(record) -> None:
    tree = Tree(Text.assemble((type(record).__name__, "bold"), f" {record.id}"))
    _add(tree, record.to_jsonable())
    out_console.print(tree)


def _add(tree: Tree, data: Any) -> None:
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        if isinstance(value, (dict, list)) and value:
            _add(tree.add(Text(str(key), style="bold")), value)
        else:
            tree.add(Text.assemble((str(key), "bold"), f": {value}"))


def print_stats(numbers: dict[str, Any]) -> None:
    table = Table(title="Urza", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    for key, value in _flatten(numbers):
        table.add_row(key, str(value))
    out_console.print(table)


def _flatten(data: dict[str, Any], prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value

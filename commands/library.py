"""`esper library`: the workspace's blueprint and kernel catalog (Urza)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from esper_cli.context import get_context, out_console

app = typer.Typer(
    help="The catalog of blueprints and kernels (Urza).\n\n"
    "Example: esper library init && esper library list --kind kernels --status VALIDATED",
    no_args_is_help=True,
)


class Kind(str, Enum):
    BLUEPRINTS = "blueprints"
    KERNELS = "kernels"


def _open(ctx: typer.Context):
    from esper.urza import Urza

    return Urza.open(get_context(ctx).workspace.require())


@app.command()
def init(ctx: typer.Context) -> None:
    """Create the workspace (if needed) and load the standard blueprints; safe to rerun.

    Example: esper --workspace ./ws library init
    """
    from esper.library import announce, init_workspace, notice_bus

    ectx = get_context(ctx)
    with notice_bus(ectx.workspace, ectx.redis_url) as bus:
        created, registered = init_workspace(ectx.workspace)
        announce(bus, registered, submitted_by="library")
    added = sum(r.created for r in registered)
    data = {"workspace": str(ectx.workspace.root), "created": created,
            "blueprints_added": added, "blueprints_present": len(registered) - added}
    ectx.emit(data, lambda: out_console.print(
        f"{'Created' if created else 'Using'} workspace {ectx.workspace.root}: "
        f"{added} standard blueprints added, {len(registered) - added} already present."))


@app.command("list")
def list_(
    ctx: typer.Context,
    kind: Annotated[Kind, typer.Option(help="What to list.")] = Kind.BLUEPRINTS,
    status: Annotated[str | None, typer.Option(
        help="Only this status (blueprints: e.g. UNVALIDATED; kernels: e.g. VALIDATED).")] = None,
    tag: Annotated[str | None, typer.Option(help="Kernels: only those with this tag.")] = None,
    origin: Annotated[str | None, typer.Option(
        help="Blueprints: only this origin (library, human, karn).")] = None,
    target: Annotated[str | None, typer.Option(help="Kernels: only this device target.")] = None,
) -> None:
    """List blueprints or kernels.

    Example: esper library list --kind kernels --tag low_memory
    """
    from commands._render import blueprint_rows, kernel_rows, print_table
    from esper.contracts import BlueprintStatus, KernelStatus
    from esper.errors import BadInputError

    for option, value, filters in (("--tag", tag, Kind.KERNELS), ("--target", target, Kind.KERNELS),
                                   ("--origin", origin, Kind.BLUEPRINTS)):
        if value is not None and filters is not kind:  # ignored, it would list everything
            raise BadInputError(f"{option} filters {filters.value}, not {kind.value}: add "
                                f"--kind {filters.value}")
    ectx = get_context(ctx)
    with _open(ctx) as urza:
        if kind is Kind.BLUEPRINTS:
            status_enum = _parse_enum(BlueprintStatus, status, "--status")
            items = urza.list_blueprints(status=status_enum, origin=_parse_origin(origin))
            columns, rows = blueprint_rows(items)
        else:
            status_enum = _parse_enum(KernelStatus, status, "--status")
            items = urza.list_kernels(status=status_enum, tag=tag, target=target)
            columns, rows = kernel_rows(items)
    ectx.emit([i.to_jsonable() for i in items],
              lambda: print_table(f"{len(items)} {kind.value}", columns, rows))


@app.command()
def show(ctx: typer.Context, item_id: Annotated[str, typer.Argument(
        metavar="ID", help="A blueprint or kernel id, or a unique prefix of one.")]) -> None:
    """Show one blueprint or kernel in full.

    Example: esper library show 3fa2c1
    """
    from commands._render import print_record
    from esper.library import find_record

    ectx = get_context(ctx)
    with _open(ctx) as urza:
        record = find_record(urza, item_id)
    ectx.emit(record.to_jsonable(), lambda: print_record(record))


@app.command()
def query(
    ctx: typer.Context,
    blueprint: Annotated[str | None, typer.Option(help="Only kernels of this blueprint id.")] = None,
    interface: Annotated[str | None, typer.Option(
        help="linear:IN:OUT or conv2d:IN:OUT[:STRIDE].")] = None,
    target: Annotated[str | None, typer.Option(help="Device target, e.g. cpu, h100.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    pipeline: Annotated[str | None, typer.Option(help="fast, standard or aggressive.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Required tag (repeatable).")] = None,
    prefer: Annotated[list[str] | None, typer.Option(help="Preferred tag (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Excluded tag (repeatable).")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="Latency cap in ms.")] = None,
    max_memory_mb: Annotated[float | None, typer.Option(help="Peak memory cap in MB.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many results.")] = 50,
) -> None:
    """Find VALIDATED kernels as Tamiyo does (KernelQuery): filter, then rank by preferred
    tags and measured latency.

    Example: esper library query --interface linear:64:16 --tag low_memory --prefer high_speed
    """
    from commands._render import kernel_rows, print_table
    from esper.contracts import KernelInterface, KernelQuery

    fields = {"blueprint_id": blueprint, "target": target, "dtype": dtype, "pipeline": pipeline,
              "required_tags": tag or [], "preferred_tags": prefer or [],
              "excluded_tags": exclude or [], "max_latency_ms": max_latency_ms,
              "max_memory_mb": max_memory_mb, "limit": limit,
              "interface": KernelInterface.parse(interface).to_jsonable() if interface else None}
    q = KernelQuery.from_jsonable(fields, source="query options")
    ectx = get_context(ctx)
    with _open(ctx) as urza:
        kernels = urza.query_kernels(q).matching_kernels
    columns, rows = kernel_rows(kernels)
    ectx.emit([k.to_jsonable() for k in kernels],
              lambda: print_table(f"{len(kernels)} matching kernels", columns, rows))


@app.command("import")
def import_(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="Blueprint IR JSON files.")],
) -> None:
    """Validate blueprint IR files and add them to the catalog (all or none; a known IR,
    by hash, is reported and left as it is). New blueprints are announced to a running forge
    on the bus (compilation.blueprint.submitted).

    Example: esper library import my_branch.json
    """
    from esper.library import announce, notice_bus, read_ir_files, register

    ectx = get_context(ctx)
    irs = read_ir_files(files)
    with _open(ctx) as urza, notice_bus(ectx.workspace, ectx.redis_url) as bus:
        registered = register(urza, irs, origin="human", actor="library.import")
        announce(bus, registered, submitted_by="human")
    data = [{"source": r.source, "id": r.blueprint.id, "name": r.blueprint.name,
             "created": r.created} for r in registered]

    def render() -> None:
        for r in registered:
            verb = "added" if r.created else "already present"
            out_console.print(f"{r.source}: {verb} as {r.blueprint.name} ({r.blueprint.id[:12]})")

    ectx.emit(data, render)


@app.command()
def export(
    ctx: typer.Context,
    blueprint_id: Annotated[str, typer.Argument(metavar="ID", help="Blueprint id or prefix.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of "
                                                "stdout.")] = None,
) -> None:
    """Print a blueprint's IR as JSON (re-importable).

    Example: esper library export 3fa2c1 -o branch.json
    """
    from esper.library import export_ir, write_output

    with _open(ctx) as urza:
        text = export_ir(urza, blueprint_id)
    if out is None:
        typer.echo(text, nl=False)
    else:
        write_output(out, text, workspace=get_context(ctx).workspace)


@app.command()
def verify(ctx: typer.Context) -> None:
    """Check the audit chain, every blob's hash and every signature. Exit 3 on any problem.

    Example: esper library verify && echo intact
    """
    from dataclasses import asdict

    from esper.errors import IntegrityError

    ectx = get_context(ctx)
    with _open(ctx) as urza:
        report = urza.verify()

    def render() -> None:
        out_console.print(f"audit chain: {report.audit.rows} rows, "
                          f"{'intact' if report.audit.ok else 'BROKEN'}")
        out_console.print(f"blobs: {report.blobs_checked} checked; validation reports: "
                          f"{report.reports_checked} checked")
        for problem in report.problems:
            out_console.print(Text.assemble(("problem:", "red"), f" {problem}"))
        if report.ok:
            out_console.print(Text("workspace intact", style="green"))

    ectx.emit({**asdict(report), "ok": report.ok}, render)
    if not report.ok:
        raise IntegrityError(f"{len(report.problems)} integrity problem(s); first: "
                             f"{report.problems[0]}")


@app.command()
def lineage(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="A run id under the workspace's runs/, or a run "
                                       "directory.", show_default=False)],
) -> None:
    """Show a run's lineage: every fossilized adaptation, its kernel and blueprint, the metric
    before and after, and the audit rows it cites, each checked against the workspace's
    hash-chained audit log (exit 3 when one does not match).

    Example: esper library lineage quickstart-20260101-120000-ab12
    """
    from esper.errors import BadInputError, IntegrityError
    from esper.tolaria.export import read_lineage
    from esper.tolaria.run import find_run

    ectx = get_context(ctx)
    workspace = ectx.workspace if ectx.workspace.exists() else None
    path = find_run(run, workspace) / "lineage.json"
    if not path.is_file():
        raise BadInputError(f"{path.parent}: no lineage.json yet (a run writes it when it ends; "
                            "a stopped or killed run, once resumed to its end)")
    record = read_lineage(path)
    adaptations = record["adaptations"]
    cited = {int(a["seq"]): a["row_hash"] for entry in adaptations
             for a in entry.get("audit", [])}
    problems: list[str] = []
    if workspace is not None and cited:
        with _open(ctx) as urza:
            stored = {r["seq"]: r["row_hash"] for r in urza.audit_rows(seqs=cited)}
            chain = urza.verify_audit_chain()
        problems = [f"audit row {seq}: " + ("missing from the workspace" if seq not in stored
                                            else "hash differs from the workspace's")
                    for seq, digest in sorted(cited.items()) if stored.get(seq) != digest]
        if not chain.ok:
            problems.append(f"audit chain broken at row {chain.first_bad_seq}: {chain.reason}")
    checked = "not checked (no workspace)" if workspace is None else (
        f"{len(cited)} audit rows checked" + ("" if problems else ", all match"))

    def render() -> None:
        from commands._render import print_table

        rows = [[a["seed_id"], a.get("layer", ""), a["kernel_artifact_id"],
                 f"{a.get('germinated_epoch', '-')}-{a.get('fossilized_epoch', '-')}",
                 _metric_change(a), str(a.get("parameters", "-")), str(len(a.get("audit", [])))]
                for a in adaptations]
        print_table(f"lineage of {record.get('run_id', run)}: {len(adaptations)} fossilized",
                    ["seed", "layer", "kernel", "epochs", "metric", "params", "audit rows"], rows,
                    wrap=("metric",))
        others = record.get("other_outcomes", [])
        if others:
            print_table("other outcomes", ["seed", "kernel", "outcome", "epoch", "reason"],
                        [[o["seed_id"], o["kernel_artifact_id"], o["outcome"], str(o["epoch"]),
                          o.get("reason", "")] for o in others], wrap=("reason",))
        out_console.print(f"evidence: {checked}", highlight=False)
        for problem in problems:
            out_console.print(Text.assemble(("problem:", "red"), f" {problem}"))

    ectx.emit({**record, "evidence": {"checked": workspace is not None, "problems": problems}},
              render)
    if problems:
        raise IntegrityError(f"lineage of {record.get('run_id', run)}: {problems[0]}")


def _metric_change(entry: dict) -> str:
    if "pre_metric" not in entry:
        return "-"
    return f"{entry.get('metric', 'metric')} {entry['pre_metric']:.4g} -> {entry['post_metric']:.4g}"


@app.command()
def stats(ctx: typer.Context) -> None:
    """Counts of blueprints and kernels by status, blobs, reports.

    Example: esper --json library stats
    """
    from commands._render import print_stats

    ectx = get_context(ctx)
    with _open(ctx) as urza:
        numbers = urza.stats()
    ectx.emit(numbers, lambda: print_stats(numbers))


def _parse_origin(value: str | None) -> str | None:
    """--origin, checked as --status is: a misspelt origin would list nothing and exit 0."""
    if value is None:
        return None
    from typing import get_args

    from esper.contracts import Blueprint
    from esper.errors import BadInputError

    origins = get_args(Blueprint.model_fields["origin"].annotation)
    if value.lower() not in origins:
        raise BadInputError(f"--origin: unknown origin {value!r}; choose from {', '.join(origins)}")
    return value.lower()


def _parse_enum(enum_cls, value: str | None, option: str):
    if value is None:
        return None
    try:
        return enum_cls(value.upper())
    except ValueError:
        from esper.errors import BadInputError

        choices = ", ".join(m.value for m in enum_cls)
        raise BadInputError(f"{option}: unknown status {value!r}; choose from {choices}") from None

"""The blueprint library: how validated IRs get into Urza (`esper library init` / `import`).

Sits above both `esper.blueprints` (parse, validate, hash) and `esper.urza` (store), which are
siblings and never import each other.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from esper._fs import replace_file
from esper.blueprints import (
    BlueprintIR,
    BlueprintValidationError,
    canonical_json,
    load_ir,
    standard_library,
    validate,
)
from esper.blueprints.ir import MAX_IR_BYTES
from esper.contracts import Blueprint, BlueprintSubmitted, Topic
from esper.errors import BadInputError, BusUnavailableError, EsperError, NotFoundError
from esper.oona import Oona
from esper.urza import Urza
from esper.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registered:
    blueprint: Blueprint
    created: bool  # False: the same IR (by hash) was already in the catalog; nothing changed
    source: str


def register(urza: Urza, irs: list[tuple[BlueprintIR, str]], *, origin: str,
             actor: str) -> list[Registered]:
    """Validate every IR first, then add them all: a bad one means none is added."""
    for ir, source in irs:
        validate(ir, source=source)
    return [
        Registered(*urza.add_blueprint(canonical_json(ir), name=ir.name,
                                       interface_kind=ir.interface_kind, origin=origin,
                                       actor=actor), source)
        for ir, source in irs
    ]


def read_ir_files(paths: list[Path]) -> list[tuple[BlueprintIR, str]]:
    irs = []
    for path in paths:
        if path.is_dir():
            raise BadInputError(f"{path}: is a directory; name the IR files in it")
        if not path.exists():
            raise NotFoundError(f"{path}: no such file")
        if not path.is_file():
            raise BadInputError(f"{path}: not a regular file")
        try:
            size = path.stat().st_size
            if size > MAX_IR_BYTES:  # refused unread: a file of any size costs nothing
                raise BlueprintValidationError("schema", f"the IR is {size} bytes; the limit is "
                                               f"{MAX_IR_BYTES}", source=str(path))
            with path.open("rb") as f:
                data = f.read(MAX_IR_BYTES + 1)  # one that grew since is still refused
        except OSError as e:
            raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from None
        irs.append((load_ir(data, source=str(path)), str(path)))
    return irs


def init_workspace(workspace: Workspace) -> tuple[bool, list[Registered]]:
    """Create the workspace (idempotent) and load the standard blueprints into it."""
    created = workspace.create()
    with Urza.open(workspace) as urza:
        irs = [(ir, f"standard library: {ir.name}") for ir in standard_library()]
        return created, register(urza, irs, origin="library", actor="library.init")


@contextmanager
def notice_bus(workspace: Workspace, redis_url: str | None) -> Iterator[Oona | None]:
    """The bus on which to tell the forge about new blueprints, or None when nobody listens.

    Urza is the record and the forge polls it, so the notice only saves it a wait: an
    unreachable bus is a warning. A malformed URL is bad input, raised before anything changes.
    """
    try:
        bus = Oona.connect_if_running(workspace, redis_url, sender_id="library")
    except BusUnavailableError as e:
        log.warning("%s; the forge will find new blueprints when it next polls Urza", e)
        bus = None
    try:
        yield bus
    finally:
        if bus is not None:
            bus.close()


def announce(bus: Oona | None, registered: list[Registered], *, submitted_by: str) -> int:
    """Publish `compilation.blueprint.submitted` for each newly added blueprint; return how many."""
    new = [r.blueprint for r in registered if r.created]
    if bus is None or not new:
        return 0
    notices = [(Topic.COMPILATION_BLUEPRINT_SUBMITTED,
                BlueprintSubmitted(blueprint_id=b.id, submitted_by=submitted_by, name=b.name))
               for b in new]
    try:
        bus.publish_many(notices)
    except BusUnavailableError as e:
        log.warning("%s; the forge will find new blueprints when it next polls Urza", e)
        return 0
    return len(new)


def export_ir(urza: Urza, blueprint_id: str) -> str:
    """The IR of a blueprint as indented JSON (its canonical form hashes to the blueprint id)."""
    blueprint = urza.get_blueprint(blueprint_id)
    try:
        ir = json.loads(urza.blueprint_ir(blueprint.id))
    except ValueError:
        raise BadInputError(f"blueprint {blueprint.id}: stored IR is not JSON") from None
    return json.dumps(ir, indent=2, sort_keys=True) + "\n"


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def write_output(path: Path, text: str, *, workspace: Workspace | None = None) -> Path:
    """Write `text` to a file the user named (`-o PATH`), atomically; returns the file written.

    A symlink is followed: the file it points to is replaced and the link stays as it is.
    Refused with one line (exit 2), before anything is written: a directory, a path whose
    directory does not exist (none is made), anything that exists and is not a regular file (a
    FIFO, device or socket is never replaced by a file), an existing file this user may not
    write, a path among `workspace`'s own files (its catalog, store, keys, runs). An existing
    file keeps its permission bits.
    """
    path = Path(path)
    target = Path(os.path.realpath(path))
    where = f"{path} (-> {target})" if path.is_symlink() else str(path)
    if workspace is not None and workspace.holds(target):
        raise BadInputError(f"{where}: inside the workspace's own files ({workspace.root}); "
                            "write the export elsewhere")
    try:
        info = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        info = None
    except OSError as e:  # a symlink loop, a path through a file
        raise BadInputError(f"{where}: cannot write there ({e.strerror})") from None
    if info is None:
        if not target.parent.is_dir():
            what = "is not a directory" if target.parent.exists() else "does not exist"
            raise BadInputError(f"{where}: directory {target.parent} {what}")
        mode = 0o644
    elif stat.S_ISDIR(info.st_mode):
        raise BadInputError(f"{where}: is a directory; name a file to write")
    elif not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _NOT_REGULAR if test(info.st_mode)), "not a file")
        raise BadInputError(f"{where}: exists and is {kind}, not a regular file; refusing to "
                            "replace it")
    elif not os.access(target, os.W_OK):
        raise BadInputError(f"{where}: the file is not writable")
    else:
        mode = stat.S_IMODE(info.st_mode)
    try:
        replace_file(target, text.encode("utf-8"), mode)
    except OSError as e:
        error = BadInputError if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else EsperError
        raise error(f"{where}: cannot write ({e.strerror})") from None
    return target


def find_record(urza: Urza, item_id: str):
    """A blueprint or a kernel by id or unique prefix. Kernel ids contain '-' and blueprint ids
    never do; a kernel id's first 12 characters are its blueprint's, so a bare prefix names the
    blueprint."""
    if "-" in item_id:
        return urza.get_kernel(item_id)
    return urza.get_blueprint(item_id)

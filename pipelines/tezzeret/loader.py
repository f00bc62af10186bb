"""Loading a kernel artifact: verify everything, then rebuild it (used by Kasmina and Urabrask).

    kernel = load_kernel(urza, kernel_id, device="cuda")   # IntegrityError (exit 3) if anything
    y = kernel(x)                                            # is off; forward and backward work

The order is the whole point: the manifest blob is read once and checked against its hash, its
signature verified against the workspace's forge key, and the manifest parsed from those very
bytes; every file is read once, checked against the hash in the manifest, and only then handed
to a deserializer (the weights to a strict reader of the safetensors format that makes the
tensors on the bytes read, a compiled function to torch's `load_compiled_function`). The module
is rebuilt from the IR, whose hash is the blueprint id. A compiled function is attached only if
it was built with the running toolchain and builder; otherwise the eager module runs and
`fallback_reason` says why (logged once).

With `require_validated` (Kasmina's use) the kernel must be VALIDATED by a report that verifies
against the workspace's bench key.

Every load reads every blob it uses and checks its sha256, and verifies both Ed25519
signatures. What is not redone per load is parsing, each cached only under the very bytes it
parsed: a public key by the key file's exact bytes (the file is read on every load, so a
replaced key takes effect at once), a signed manifest or report by its exact verified body, a
weights file's layout by the sha256 its bytes were just checked against, the blueprint's IR
parse, static check and skeleton by its blueprint id (the hash of its bytes), the interface
and the bytes themselves, and how a weights file fills a skeleton (checked once) on the
skeleton by the weights' sha256. A load makes a fresh copy of the skeleton and gives it the
signed weights, sent to the device in one copy: no initial weights are drawn only to be
overwritten.

torch, the catalog and the signing library are imported when a kernel is loaded: the CLI and the
GPU check script import this module.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from esper.blueprints import load_ir
from esper.contracts import (
    CompiledKernelArtifact,
    KernelInterface,
    KernelStatus,
    UrabraskValidationReport,
)
from esper.errors import BadInputError, EsperError, IntegrityError, NotFoundError
from pipelines.tezzeret.artifact import Manifest
from pipelines.tezzeret.compile import (
    COMPILED_FILE,
    WEIGHTS_FILE,
    CompiledVariant,
    InputForm,
    input_form,
    read_bundle,
)
from pipelines.tezzeret.toolchain import (
    builder_digest,
    current_toolchain,
    device_target,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from esper.blueprints import BlueprintIR
    from esper.urza import ArtifactStore, Urza
    from esper.urza.kernels import KernelLoadRecord

log = logging.getLogger(__name__)
_logged_fallbacks: set[tuple[str, str]] = set()


class KernelNotValidatedError(EsperError):
    """A kernel that the bench has not validated was asked for where only validated ones may run."""


class CompiledForward:
    """A kernel's compiled variants, chosen per call by their guards.

    An input that no variant covers (its shape is outside every bucket's guards, the module is in
    eval mode or frozen, grad mode is off, autocast is on, or the caller is itself being traced
    by torch.compile) runs the eager module: same function, no compilation ever.
    `compiled_calls` and `eager_calls` count which path ran.
    """

    def __init__(self, module: nn.Module, form: InputForm,
                 variants: list[tuple[CompiledVariant, Callable[..., Any]]]) -> None:
        self.module = module
        self.form = form
        self.variants = [meta for meta, _ in variants]
        self._by_grad = {flag: [fn for meta, fn in variants if meta.input_requires_grad is flag]
                         for flag in (True, False)}
        self.compiled_calls = 0
        self.eager_calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled(x.device.type)):
            flat = self._canonical(x)
            if flat is not None:
                for fn in self._by_grad[flat.requires_grad]:
                    if fn.guard_check(self.module, flat):
                        self.compiled_calls += 1
                        y = fn(self.module, flat)
                        return y if flat is x else y.reshape(*x.shape[:-1], y.shape[-1])
        self.eager_calls += 1
        return self.module(x)

    def _canonical(self, x: torch.Tensor) -> torch.Tensor | None:
        """The input in the form the variants were compiled for: any leading dims flattened."""
        if self.form == "maps":
            return x if x.dim() == 4 else None
        if self.form == "sequence":
            if x.dim() < 3:
                return None
            return x if x.dim() == 3 else x.reshape(-1, *x.shape[-2:])  # (batch, T, C)
        if x.dim() < 2:
            return None
        return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (rows, C)


class LoadedKernel:
    """A verified kernel, ready to run: `kernel(x)` runs the compiled function where there is one
    and it covers `x`, else the eager module. Gradients reach `module`'s parameters either way."""

    def __init__(self, module: nn.Module, compiled: CompiledForward | None, manifest: Manifest,
                 artifact: CompiledKernelArtifact, fallback_reason: str | None) -> None:
        self.module = module
        self.compiled = compiled
        self.manifest = manifest
        self.artifact = artifact
        self.fallback_reason = fallback_reason

    @property
    def kernel_id(self) -> str:
        return self.artifact.id

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            return self.compiled(x)
        return self.module(x)

    def __repr__(self) -> str:
        path = "compiled" if self.compiled is not None else "eager"
        return f"LoadedKernel({self.artifact.id}, {path})"


def load_kernel(urza: Urza, kernel_id: str, *, device: str = "cpu",
                require_validated: bool = True, attach: bool = True) -> LoadedKernel:
    """Verify and rebuild one kernel artifact on `device`. IntegrityError (exit 3) names what did
    not verify; KernelNotValidatedError (exit 1) if `require_validated` and it is not VALIDATED.

    With `attach=False` a compiled function is verified (its file's hash) but not deserialized:
    `compiled` is None and the eager module runs (for callers that only use `module`)."""
    artifact = urza.get_kernel(kernel_id)
    verified = _verify(urza, urza.kernel_load_record(artifact.id), require_validated,
                       _key_files(urza.workspace))
    manifest = verified.manifest
    module = _rebuild(verified, device)

    compiled, reason = None, None
    if manifest.compiled and attach:
        reason = _compiled_mismatch(manifest, device)
        if reason is None:
            try:
                compiled = attach_compiled(module, input_form(verified.ir, manifest.interface),
                                           bytes(verified.files[COMPILED_FILE]))
            except IntegrityError:
                raise
            except Exception as e:  # verified bytes that this process cannot run
                reason = f"the compiled function does not load here ({type(e).__name__}: {e})"
        if reason is not None and (artifact.id, reason) not in _logged_fallbacks:
            _logged_fallbacks.add((artifact.id, reason))
            log.warning("kernel %s: running the eager module: %s", artifact.id, reason)
    return LoadedKernel(module, compiled, manifest, artifact, reason)


def attach_compiled(module: nn.Module, form: InputForm, bundle: bytes) -> CompiledForward:
    """Deserialize `compiled.bin` for `module`. Only ever called on bytes whose hash was just
    checked against a signed manifest (or, in scripts/gpu_forge_check.py, against the compile
    result the script itself produced): this runs torch's pickle-based loader."""
    import torch

    variants = []
    for meta, payload in read_bundle(bundle):
        fn = torch.compiler.load_compiled_function(io.BytesIO(payload))
        fn.disable_guard_check()  # CompiledForward checks the guards before each call
        variants.append((meta, fn))
    return CompiledForward(module, form, variants)


# Verification ----------------------------------------------------------------------------------

@dataclass
class _Verified:
    """Everything a load checked: the catalog record, the signed manifest, every file it names
    (hash-checked), and the blueprint's parsed IR and skeleton."""

    record: KernelLoadRecord
    manifest: Manifest
    files: dict[str, bytearray]
    ir: BlueprintIR
    skeleton: _Skeleton


def _verify(urza: Urza, record: KernelLoadRecord, require_validated: bool,
            key_files: dict[str, str], used: tuple[str, ...] | None = None) -> _Verified:
    """Check one kernel completely, or raise the first failure in this order: VALIDATED status,
    the bench-signed report, the forge-signed manifest and its match with the catalog row, each
    file's hash, the blueprint IR's hash, the blueprint's static check.

    `used` names the artifact's files the caller will use (None: every file the manifest
    names); only those are read, and each of them is hash-checked. A file left out is never
    read by this load: whoever uses it loads it through here and has it checked (Kasmina's
    source leaves out a compiled function it never runs; `load_kernel` reads it).

    Everything runs on the calling thread: reading the files on a helper thread while the
    signatures verified saved nothing, since waking a thread costs about what it overlaps
    (docs/bench-kasmina.md). Nothing is deserialized here: the documents and the IR are JSON; the weights are parsed by
    `_rebuild`, after every check."""
    from esper.signing import open_signed

    store, what = urza.store, f"kernel {record.id}"
    if require_validated:
        if record.status is not KernelStatus.VALIDATED:
            reason = f" ({record.status_reason})" if record.status_reason else ""
            raise KernelNotValidatedError(f"kernel {record.id} is {record.status.value}"
                                          f"{reason}; only VALIDATED kernels are loaded")
        if record.report_blob is None:
            raise IntegrityError(f"{what} is VALIDATED without a validation report")
        report_document = _blob(store, record.report_blob, f"{what}: validation report")
        _check_report(open_signed(report_document, _trusted_key(key_files["bench"]),
                                  what=f"{what}: validation report"), record)
    document = _blob(store, record.kernel_binary_ref, f"{what}: manifest")
    manifest = _signed_manifest(open_signed(document, _trusted_key(key_files["forge"]),
                                            what=f"{what}: manifest"), what)
    _check_manifest_matches(manifest, record)
    files = {name: _blob(store, digest, f"{what}: {name}", writable=True)
             for name, digest in manifest.files.items() if used is None or name in used}
    ir_bytes = _blob(store, record.blueprint_id, f"{what}: blueprint IR")
    ir, skeleton = _checked_blueprint(record.blueprint_id, str(record.interface), ir_bytes)
    return _Verified(record, manifest, files, ir, skeleton)


@functools.lru_cache(maxsize=256)
def _signed_manifest(body: bytes, what: str) -> Manifest:
    """The manifest in `body`, bytes whose signature was just verified (parsed once per
    distinct body: a re-load parses nothing)."""
    try:
        return Manifest.from_json(body, source=f"{what}: signed manifest")
    except BadInputError as e:
        raise IntegrityError(str(e)) from None


@functools.lru_cache(maxsize=256)
def _signed_report(body: bytes, what: str) -> UrabraskValidationReport:
    try:
        return UrabraskValidationReport.from_json(body, source=what)
    except BadInputError as e:
        raise IntegrityError(str(e)) from None


def _check_report(body: bytes, record: KernelLoadRecord) -> None:
    """The bench-signed report (`body`, just verified) must pass this very kernel: the catalog's
    report row only points at the signed document, nothing is taken from the row."""
    what = f"kernel {record.id}: validation report"
    report = _signed_report(body, what)
    if report.kernel_artifact_id != record.id or report.blueprint_id != record.blueprint_id:
        raise IntegrityError(f"{what}: the signed report is for kernel {report.kernel_artifact_id}")
    if not report.passed_validation:
        raise IntegrityError(f"{what}: the signed report did not pass the kernel")


def _blob(store: ArtifactStore, digest: str, what: str, *, writable: bool = False):
    try:
        return store.get_writable(digest) if writable else store.get(digest)
    except NotFoundError as e:
        raise IntegrityError(f"{what}: missing from the artifact store ({e})") from None
    except IntegrityError as e:
        raise IntegrityError(f"{what}: {e}") from None


def _check_manifest_matches(manifest: Manifest, record: KernelLoadRecord) -> None:
    """The signed manifest must describe the very kernel the catalog row names."""
    pairs = {
        "kernel id": (manifest.kernel_artifact_id, record.id),
        "blueprint": (manifest.blueprint_id, record.blueprint_id),
        "interface": (str(manifest.interface), str(record.interface)),
        "target": (manifest.target, record.target),
        "dtype": (manifest.dtype, record.dtype),
        "pipeline": (manifest.pipeline.value, record.pipeline.value),
    }
    for fact, (signed, catalog) in pairs.items():
        if signed != catalog:
            raise IntegrityError(f"kernel {record.id}: the signed manifest says {fact} "
                                 f"{signed}; the catalog says {catalog}")
    if not manifest.config_hash.startswith(record.toolchain_hash):
        raise IntegrityError(f"kernel {record.id}: the catalog's toolchain hash "
                             f"{record.toolchain_hash} is not the signed config hash")


def _key_files(workspace) -> dict[str, str]:
    """Where the workspace's forge and bench public keys are (as `Workspace.public_key_path`)."""
    return {role: str(workspace.public_key_path(role)) for role in ("forge", "bench")}


def _trusted_key(path: str):
    """The public key in the file at `path`: the file is read on every call and parsed once per
    distinct content. (Not cached by the file's mtime, size and inode: a key rewritten in place
    within one timestamp tick, same size, would go unnoticed.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        pem = os.read(fd, _MAX_KEY_FILE)
    finally:
        os.close(fd)
    key = _parse_public_key(pem)
    if key is None:
        raise IntegrityError(f"{path}: not an Ed25519 public key")
    return key


_MAX_KEY_FILE = 1 << 16  # a PEM Ed25519 public key is 113 bytes


@functools.lru_cache(maxsize=16)
def _parse_public_key(pem: bytes):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        return None
    return key if isinstance(key, Ed25519PublicKey) else None


# Rebuilding ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Slot:
    """One tensor of a skeleton: `modules[owner]` holds it as parameter or buffer `attr`."""

    owner: int
    attr: str
    parameter: bool
    requires_grad: bool
    shape: tuple[int, ...]


_CONTAINERS = (dict, set)  # a module's attributes that each copy of it needs its own of


@dataclass(frozen=True)
class _Skeleton:
    """A blueprint's module at one interface, without values (`build_empty` unfilled: torch's
    layers hold `Unfilled` placeholders, any other module meta tensors), and how to copy it and
    fill it: its modules in pre-order (each with the names of its container attributes and its children's
    indices) and where each tensor of its state dict goes."""

    modules: list[tuple[nn.Module, tuple[str, ...], tuple[tuple[str, int], ...]]]
    slots: dict[str, _Slot]  # state-dict name -> slot
    # How each weights file this skeleton was loaded with fills it (`_fill_plan`).
    fills: dict[tuple[str, str], _FillPlan] = field(default_factory=dict, compare=False,
                                                    repr=False)

    @classmethod
    def of(cls, root: nn.Module) -> _Skeleton:
        """The plan of `root`. Its slots are the entries of `root.state_dict()`, in its order
        (each module's parameters, its persistent buffers, then its children's), gathered in
        the one walk over the modules that the plan makes anyway."""
        plan: list[tuple | None] = []
        slots: dict[str, _Slot] = {}

        def visit(prefix: str, module: nn.Module) -> int:
            index = len(plan)
            plan.append(None)
            state = vars(module)
            for attr, tensor in state["_parameters"].items():
                if tensor is not None:
                    slots[prefix + attr] = _Slot(index, attr, True, tensor.requires_grad,
                                                 tuple(tensor.shape))
            skipped = state["_non_persistent_buffers_set"]
            for attr, tensor in state["_buffers"].items():
                if tensor is not None and attr not in skipped:
                    slots[prefix + attr] = _Slot(index, attr, False, False, tuple(tensor.shape))
            children = tuple([(name, visit(f"{prefix}{name}.", child))
                              for name, child in state["_modules"].items() if child is not None])
            plan[index] = (module, tuple([name for name, value in state.items()
                                          if isinstance(value, _CONTAINERS)]), children)
            return index

        visit("", root)
        return cls(plan, slots)

    def fresh(self) -> list[nn.Module]:
        """A new module shaped like the skeleton (first in the list, its submodules after it in
        pre-order), sharing no container with it: each module a new instance with the skeleton's
        attributes, each of its dicts and sets (parameters, buffers, submodules, hooks) copied,
        so that assigning tensors or registering hooks on the copy leaves the skeleton as it is.
        (Building anew costs many times this, and `copy.deepcopy` as much.)"""
        modules: list = [None] * len(self.modules)
        for index in range(len(modules) - 1, -1, -1):  # children (later in pre-order) first
            template, containers, children = self.modules[index]
            state = vars(template).copy()
            for name in containers:
                state[name] = state[name].copy()
            submodules = state["_modules"]
            for name, child in children:
                submodules[name] = modules[child]
            module = modules[index] = object.__new__(type(template))
            object.__setattr__(module, "__dict__", state)  # the copy itself, not copied again
        return modules


@functools.lru_cache(maxsize=256)
def _checked_blueprint(blueprint_id: str, interface: str, ir_bytes: bytes):
    """(IR, skeleton): the parsed IR and the blueprint's module at `interface`, the module
    `esper.blueprints.build` makes before its initialisation, with no weights drawn and torch's
    layers holding placeholders, not tensors (`build_empty(..., unfilled=True)`). `ir_bytes`
    hashed to `blueprint_id` when read from the store, so that is the module's id (not hashed
    again); an IR that does not pass the static check raises (and is not cached)."""
    from esper.blueprints import build_empty
    from esper.blueprints.rules import BlueprintValidationError

    source = f"blueprint {blueprint_id[:12]}"
    ir = load_ir(ir_bytes, source=source)
    try:
        module = build_empty(ir, KernelInterface.parse(interface), blueprint_id, unfilled=True)
    except BlueprintValidationError as e:
        raise e.with_source(source) from None
    return ir, _Skeleton.of(module)


def clear_caches() -> None:
    """Forget parsed keys, documents and checked blueprints (benchmarks time a first load with
    this)."""
    for cache in (_parse_public_key, _signed_manifest, _signed_report, _checked_blueprint):
        cache.cache_clear()
    _layouts.clear()


# The checked layout of each weights file, by the sha256 of its bytes (a re-load parses nothing).
_layouts: dict[str, tuple[int, dict[str, tuple]]] = {}
_MAX_LAYOUTS = 1024

# safetensors dtype names -> (torch dtype name, bytes per element)
_SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}


def _safetensors_layout(data: bytearray, what: str) -> tuple[int, dict[str, tuple]]:
    """(start of the data section, {name: (torch dtype name, shape, begin, end)}) of a
    safetensors file, checked as strictly as the safetensors library checks it: a JSON header of
    known dtypes, each tensor's byte range the size its shape says, the ranges tiling the data
    section exactly, nothing after it. (The library's own loader gives one CPU tensor per entry;
    this gives the offsets, so the whole data section goes to the device in one copy.)"""
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{what}: {WEIGHTS_FILE} is not a safetensors file ({why})")

    if len(data) < 8:
        raise bad("shorter than its header size")
    size = int.from_bytes(data[:8], "little")
    start = 8 + size
    if size == 0 or start > len(data):
        raise bad(f"a header of {size} bytes in a file of {len(data)}")
    try:
        header = json.loads(data[8:start])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("the header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not a map of strings")
    entries, spans = {}, []
    for name, entry in header.items():
        try:
            dtype, itemsize = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            valid = (set(entry) == {"dtype", "shape", "data_offsets"}
                     and all(type(n) is int and n >= 0 for n in (*shape, begin, end)))
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise bad(f"bad entry for tensor {name!r}")
        if end - begin != math.prod(shape) * itemsize:
            raise bad(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)}")
        entries[name] = (dtype, shape, begin, end)
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise bad("tensor byte ranges overlap or leave gaps")
        position = end
    if start + position != len(data):
        raise bad(f"{len(data) - start - position} bytes after the last tensor")
    return start, entries


def _rebuild(verified: _Verified, device: str, *, share_storage: bool = False) -> nn.Module:
    """A fresh copy of the skeleton given the signed weights, on `device` in the manifest's
    dtype. The weights file's data section goes to the device in one copy; each tensor is then
    its own storage (as `load_state_dict` leaves it), or, with `share_storage`, a view of that
    one copy (Kasmina's templates, whose weights are only ever copied into seed banks)."""
    import torch
    from torch import nn

    weights = verified.files[WEIGHTS_FILE]
    fill = _fill_plan(verified)
    device = torch.device(device)
    modules = verified.skeleton.fresh()
    if device.type == "cpu":  # each tensor made on the bytes read (this load's own buffer)
        tensors = [_tensor(weights, t.begin, t.end, t.dtype, t.shape) for t in fill.tensors]
        copy = False
    else:
        tensors = _device_tensors(weights, fill, device)
        copy = not share_storage
    for t, tensor in zip(fill.tensors, tensors, strict=True):
        if t.cast:
            tensor = tensor.to(fill.target)
        elif copy:
            tensor = tensor.clone()  # its own storage, not a view of the one copy
        if t.parameter:
            modules[t.owner]._parameters[t.attr] = nn.Parameter(tensor, t.requires_grad)
        else:
            modules[t.owner]._buffers[t.attr] = tensor
    return modules[0]


@dataclass(frozen=True)
class _Fill:
    """One tensor of the weights file and where it goes: bytes [begin, end) of the file as
    `dtype` and `shape`, cast to the manifest's dtype if `cast`, into the skeleton's slot
    (`owner`, `attr`, ...)."""

    owner: int
    attr: str
    parameter: bool
    requires_grad: bool
    dtype: Any  # torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int
    cast: bool


@dataclass(frozen=True)
class _FillPlan:
    """How a weights file fills a skeleton: its tensors in file order, the data section's start,
    the one dtype they share (None if several) and the manifest's dtype."""

    tensors: tuple[_Fill, ...]
    start: int
    dtype: Any
    target: Any


_MAX_FILLS = 64  # fill plans kept per skeleton (one per weights file and dtype it was loaded with)


def _fill_plan(verified: _Verified) -> _FillPlan:
    """The checked plan for filling this load's skeleton with its weights file: the file's layout
    (parsed once per sha256, `_safetensors_layout`) must name exactly the skeleton's tensors, each
    in its shape, or IntegrityError. Both are parses of bytes just verified, so the plan is kept
    on the skeleton under the weights' sha256 and the manifest's dtype: a re-load checks and
    derives nothing, it makes the tensors and assigns them."""
    import torch

    weights = verified.files[WEIGHTS_FILE]
    digest = verified.manifest.files[WEIGHTS_FILE]  # what `weights` was just checked to hash to
    key = (digest, verified.manifest.dtype)
    fills = verified.skeleton.fills
    plan = fills.get(key)
    if plan is not None:
        return plan
    what = f"kernel {verified.record.id}"
    layout = _layouts.get(digest)
    if layout is None:
        if len(_layouts) >= _MAX_LAYOUTS:
            _layouts.clear()
        layout = _layouts[digest] = _safetensors_layout(weights, what)
    start, entries = layout
    slots = verified.skeleton.slots
    if entries.keys() != slots.keys():
        missing = sorted(slots.keys() - entries.keys())
        unexpected = sorted(entries.keys() - slots.keys())
        raise IntegrityError(f"{what}: {WEIGHTS_FILE} does not fit the blueprint: missing "
                             f"{missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
    for name, (_, shape, _, _) in entries.items():
        if shape != slots[name].shape:
            raise IntegrityError(f"{what}: {WEIGHTS_FILE} does not fit the blueprint: {name} has "
                                 f"shape {list(shape)}, the blueprint's is {list(slots[name].shape)}")
    target = getattr(torch, verified.manifest.dtype)
    tensors = []
    for name, (dtype_name, shape, begin, end) in sorted(entries.items(), key=lambda e: e[1][2]):
        slot, dtype = slots[name], getattr(torch, dtype_name)
        tensors.append(_Fill(slot.owner, slot.attr, slot.parameter, slot.requires_grad, dtype,
                             shape, start + begin, start + end,
                             dtype.is_floating_point and dtype != target))
    dtypes = {t.dtype for t in tensors}
    plan = _FillPlan(tuple(tensors), start, dtypes.pop() if len(dtypes) == 1 else None, target)
    if len(fills) >= _MAX_FILLS:
        fills.clear()
    fills[key] = plan
    return plan


def _device_tensors(weights: bytearray, fill: _FillPlan, device) -> list[Any]:
    """The weights file's tensors on `device`, in the file's dtypes and `fill`'s order: views of
    one copy of the whole data section."""
    import torch

    if not fill.tensors:
        return []
    section = torch.frombuffer(weights, dtype=torch.uint8, offset=fill.start,
                               count=len(weights) - fill.start).to(device)  # the one copy
    if fill.dtype is not None:  # the usual case: one view as that dtype, split (two ops, not 3 a tensor)
        parts = section.view(fill.dtype).split([math.prod(t.shape) for t in fill.tensors])
        return [part.view(t.shape) for t, part in zip(fill.tensors, parts, strict=True)]
    return [_tensor(section, t.begin - fill.start, t.end - fill.start, t.dtype, t.shape)
            for t in fill.tensors]


def _tensor(section, begin: int, end: int, dtype, shape: tuple[int, ...]):
    """Bytes [begin, end) of `section` (a bytearray, or a uint8 tensor on the device) as a
    tensor of `dtype` and `shape`."""
    import torch

    if begin == end:
        return torch.empty(shape, dtype=dtype,
                           device=section.device if isinstance(section, torch.Tensor) else "cpu")
    if isinstance(section, torch.Tensor):
        raw = section[begin:end]
        if begin % raw.element_size() or begin % dtype.itemsize:
            raw = raw.clone()  # a view must start at a multiple of the element size
        return raw.view(dtype).view(shape)
    if begin % dtype.itemsize:
        return torch.frombuffer(bytearray(section[begin:end]), dtype=dtype).view(shape)
    return torch.frombuffer(section, dtype=dtype, offset=begin,
                            count=(end - begin) // dtype.itemsize).view(shape)


def _compiled_mismatch(manifest: Manifest, device: str) -> str | None:
    """Why the compiled function cannot run in this process, or None if it can."""
    running = current_toolchain(device)
    built = manifest.toolchain_record()
    if running.fingerprint() != manifest.toolchain_fingerprint:
        changed = "; ".join(built.differences(running)) or "toolchain fingerprint differs"
        return f"compiled with another toolchain ({changed})"
    target = device_target(device)
    if target != manifest.target:
        return f"compiled for target {manifest.target}, running on {target}"
    if manifest.builder_digest != builder_digest():
        return "the blueprint builder changed since this kernel was compiled"
    return None


class VerifiedKernelSource:
    """Kasmina's kernel source in a workspace (it satisfies `kasmina.KernelSource`): every load
    is `load_kernel`'s with `require_validated` and without the catalog contract or a compiled
    function, so only a VALIDATED kernel whose forge and bench signatures and file hashes all
    verify ever reaches a model.

    Kasmina runs loads on worker threads and a catalog connection belongs to one thread, so each
    thread that loads keeps its own connection, opened on its first load (opening and closing
    one per load cost about half of a load). `close()` closes the calling thread's connection; a
    worker thread's goes with the thread. Kasmina's seed banks run the eager module (batched with
    vmap), so a compiled function, if any, is not read (`_verify`'s `used`). The module is a
    template whose weights Kasmina only copies into its seed banks, so on a GPU its tensors are
    views of the one copy of the weights file's data (`load_kernel` gives each its own storage).
    """

    def __init__(self, workspace) -> None:
        self.workspace = workspace
        self._local = threading.local()
        self._key_files = _key_files(workspace)

    def load(self, kernel_artifact_id: str, device) -> nn.Module:
        urza = self._urza()
        record = urza.kernel_load_record(kernel_artifact_id)
        return _rebuild(_verify(urza, record, True, self._key_files, used=(WEIGHTS_FILE,)),
                        str(device), share_storage=True)

    def close(self) -> None:
        urza = getattr(self._local, "urza", None)
        if urza is not None:
            self._local.urza = None
            urza.close()

    def _urza(self) -> Urza:
        urza = getattr(self._local, "urza", None)
        if urza is None:
            from esper.urza import Urza

            urza = self._local.urza = Urza.open(self.workspace)
        return urza

"""One compile job: a blueprint IR, an interface, a device, a dtype and a pipeline -> the files
of one kernel artifact (DESIGN.md section 8).

`compile_job` runs in the forge's sandboxed child process. It builds the module from the IR
(weights drawn from the job's seed), writes `weights.safetensors`, and for the `standard` and
`aggressive` pipelines ahead-of-time compiles forward and backward with
`torch.compile(fullgraph=True).aot_compile(...)` and writes the serialized functions to
`compiled.bin`. `result.json` is written last: a directory without it holds no result. Any
failure raises; the child's exit code and stderr carry the reason, and no other pipeline is
affected. Why this torch API, per version: docs/forge-compile-api.md.

`compiled.bin` holds one serialized function per (shape bucket, input requires grad):

    b"ESPER-AOT\\n" | header length (8 bytes, little-endian) | header JSON | payloads

The header (`CompiledBundle`) names each variant and its byte range. The payloads are what
`AOTCompiledFunction.serialize` returns: torch's own pickle-based format, so they are only ever
deserialized by the loader from bytes whose hash a signed manifest vouches for.

torch is imported inside the functions that need it: the daemon imports this module.
"""

from __future__ import annotations

import hashlib
import json
import resource
import struct
import time
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from esper._fs import atomic_write_bytes, atomic_write_text
from esper.blueprints import BlueprintIR, load_ir
from esper.contracts import (
    CompilationPipeline,
    CompilationRecord,
    Contract,
    KernelInterface,
    LayerKind,
)
from esper.contracts.base import describe_validation_error
from esper.errors import BadInputError, EsperError, IntegrityError
from pipelines.tezzeret.toolchain import (
    PIPELINE_OPTIONS,
    PipelineOptions,
    Toolchain,
    config_hash,
    current_toolchain,
    device_target,
    kernel_artifact_id,
)

WEIGHTS_FILE = "weights.safetensors"
COMPILED_FILE = "compiled.bin"
RESULT_FILE = "result.json"
DTYPES = ("float32", "bfloat16", "float16")
InputForm = Literal["rows", "sequence", "maps"]

_SHA256 = "0123456789abcdef"
_BUNDLE_MAGIC = b"ESPER-AOT\n"
_BUNDLE_FORMAT = "esper.aot/1"


class CompileError(EsperError):
    """A pipeline could not be produced for this job (the reason is one line)."""


def _is_sha256(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in _SHA256 for c in text)


# The job ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompileJob:
    """Everything the child needs; it reads nothing else (no catalog, no keys)."""

    blueprint_id: str
    ir_json: bytes
    interface: KernelInterface
    device: str
    dtype: str
    pipeline: CompilationPipeline
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pipeline", CompilationPipeline(self.pipeline))
        if not _is_sha256(self.blueprint_id):
            raise BadInputError(f"compile job: blueprint_id {self.blueprint_id!r} is not a sha256 "
                                "hex digest")
        if not isinstance(self.ir_json, bytes):
            raise BadInputError("compile job: ir_json must be bytes")
        if self.dtype not in DTYPES:
            raise BadInputError(f"compile job: dtype {self.dtype!r} is not one of "
                                f"{', '.join(DTYPES)}")
        if not isinstance(self.device, str) or not self.device:
            raise BadInputError("compile job: device must be a string such as cpu or cuda:0")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise BadInputError(f"compile job: seed {self.seed!r} must be an int in [0, 2**63)")

    def to_json(self) -> str:
        return json.dumps({
            "blueprint_id": self.blueprint_id, "ir_json": self.ir_json.decode("utf-8"),
            "interface": self.interface.to_jsonable(), "device": self.device,
            "dtype": self.dtype, "pipeline": self.pipeline.value, "seed": self.seed,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CompileJob:
        obj = _json_object(text, "compile job")
        keys = {"blueprint_id", "ir_json", "interface", "device", "dtype", "pipeline", "seed"}
        if set(obj) != keys:
            raise BadInputError(f"compile job: expected the keys {', '.join(sorted(keys))}, got "
                                f"{', '.join(sorted(obj))}")
        if not isinstance(obj["ir_json"], str):
            raise BadInputError("compile job: ir_json must be the IR's JSON text")
        try:
            pipeline = CompilationPipeline(obj["pipeline"])
        except ValueError:
            raise BadInputError(f"compile job: unknown pipeline {obj['pipeline']!r}") from None
        return cls(blueprint_id=obj["blueprint_id"], ir_json=obj["ir_json"].encode("utf-8"),
                   interface=KernelInterface.from_jsonable(obj["interface"], source="compile job"),
                   device=obj["device"], dtype=obj["dtype"], pipeline=pipeline, seed=obj["seed"])


@dataclass(frozen=True)
class CompileResult:
    """What the child reports in `result.json`: its files and their hashes, how it built them."""

    files: dict[str, str]
    record: CompilationRecord
    toolchain: Toolchain
    kernel_artifact_id: str
    target: str

    def to_json(self) -> str:
        return json.dumps({
            "files": dict(sorted(self.files.items())), "record": self.record.to_jsonable(),
            "toolchain": self.toolchain.to_jsonable(),
            "kernel_artifact_id": self.kernel_artifact_id, "target": self.target,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CompileResult:
        obj = _json_object(text, "compile result")
        keys = {"files", "record", "toolchain", "kernel_artifact_id", "target"}
        if set(obj) != keys:
            raise BadInputError(f"compile result: expected the keys {', '.join(sorted(keys))}")
        files = obj["files"]
        if not isinstance(files, dict) or not all(
                _is_file_name(name) and _is_sha256(digest) for name, digest in files.items()):
            raise BadInputError("compile result: files must map plain file names to sha256 "
                                "hex digests")
        if not isinstance(obj["kernel_artifact_id"], str) or not isinstance(obj["target"], str):
            raise BadInputError("compile result: kernel_artifact_id and target must be strings")
        return cls(files=dict(files),
                   record=CompilationRecord.from_jsonable(obj["record"], source="compile result"),
                   toolchain=Toolchain.from_jsonable(obj["toolchain"],
                                                     source="compile result toolchain"),
                   kernel_artifact_id=obj["kernel_artifact_id"], target=obj["target"])


def _json_object(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"{what}: malformed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadInputError(f"{what}: expected a JSON object")
    return obj


def _is_file_name(name: object) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 64 and name not in (".", "..")
            and all(c.isalnum() or c in "._-" for c in name))


# Input forms and example inputs ----------------------------------------------------------------

def input_form(ir: BlueprintIR, interface: KernelInterface) -> InputForm:
    """How a kernel's input is laid out: (N, IN) rows for position-wise linear blueprints (any
    leading dims flatten into N), (B, T, IN) for blueprints that attend over a sequence,
    (B, IN, H, W) maps for conv."""
    if interface.kind is LayerKind.CONV2D:
        return "maps"
    return "sequence" if ir.needs_sequence else "rows"


def example_shape(form: InputForm, leading: tuple[int, ...],
                  interface: KernelInterface) -> tuple[int, ...]:
    if form == "maps":
        batch, height, width = leading
        return (batch, interface.in_features, height, width)
    return (*leading, interface.in_features)


# compiled.bin ----------------------------------------------------------------------------------

class CompiledVariant(Contract):
    """One AOT-compiled function in `compiled.bin`, and the bytes [offset, offset + length)."""

    form: Literal["rows", "sequence", "maps"]
    example_shape: list[int] = Field(min_length=2, max_length=4)
    input_requires_grad: bool
    dynamic: bool
    mode: str | None
    offset: int = Field(ge=0)
    length: int = Field(gt=0)


class CompiledBundle(Contract):
    format: Literal["esper.aot/1"]
    torch: str
    variants: list[CompiledVariant] = Field(min_length=1, max_length=64)


def write_bundle(torch_version: str, variants: list[tuple[CompiledVariant, bytes]]) -> bytes:
    """The bytes of `compiled.bin` (the variants' offsets and lengths are filled in here)."""
    metas, offset = [], 0
    for meta, payload in variants:
        metas.append(meta.model_copy(update={"offset": offset, "length": len(payload)}))
        offset += len(payload)
    header = CompiledBundle(format=_BUNDLE_FORMAT, torch=torch_version, variants=metas)
    header_bytes = header.to_json().encode("utf-8")
    return b"".join([_BUNDLE_MAGIC, struct.pack("<Q", len(header_bytes)), header_bytes,
                     *(payload for _, payload in variants)])


def read_bundle(data: bytes, *, what: str = COMPILED_FILE) -> list[tuple[CompiledVariant, bytes]]:
    """Split `compiled.bin` into its variants. The payloads are returned as bytes, not loaded.
    A malformed bundle is an IntegrityError: the forge never writes one."""
    start = len(_BUNDLE_MAGIC) + 8
    if len(data) < start or not data.startswith(_BUNDLE_MAGIC):
        raise IntegrityError(f"{what}: not an Esper compiled bundle")
    (header_length,) = struct.unpack_from("<Q", data, len(_BUNDLE_MAGIC))
    body = start + header_length
    if body > len(data):
        raise IntegrityError(f"{what}: the header runs past the end of the file")
    try:
        header = CompiledBundle.model_validate_json(data[start:body])
    except ValidationError as e:
        raise IntegrityError(describe_validation_error(e, "compiled bundle header", what)) from None
    expected = 0
    out = []
    for meta in header.variants:
        if meta.offset != expected:
            raise IntegrityError(f"{what}: variant payloads do not tile the file")
        expected += meta.length
        out.append((meta, data[body + meta.offset:body + meta.offset + meta.length]))
    if body + expected != len(data):
        raise IntegrityError(f"{what}: {len(data) - body - expected} bytes beyond the last "
                             "variant")
    return out


# The job, run ----------------------------------------------------------------------------------

def compile_job(job: CompileJob, out_dir: Path) -> CompileResult:
    """Build, (for compiled pipelines) AOT-compile, and write the artifact's files to `out_dir`;
    `result.json` last. Raises on any failure."""
    import torch

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_FILE).unlink(missing_ok=True)  # a failed rerun must not leave an old one
    actual = hashlib.sha256(job.ir_json).hexdigest()
    if actual != job.blueprint_id:
        raise IntegrityError(f"compile job: the IR hashes to {actual}, not to its blueprint id "
                             f"{job.blueprint_id}")
    ir = load_ir(job.ir_json, source=f"blueprint {job.blueprint_id[:12]}")
    options = PIPELINE_OPTIONS[job.pipeline]
    toolchain = current_toolchain(job.device)
    target = device_target(job.device)
    digest = config_hash(toolchain, job.interface, job.dtype, job.pipeline)
    kernel_id = kernel_artifact_id(job.blueprint_id, target, job.pipeline, digest)

    from esper.blueprints import build

    module = build(ir, job.interface, dtype=getattr(torch, job.dtype), device=job.device,
                   seed=job.seed)
    files = {WEIGHTS_FILE: _write(out_dir / WEIGHTS_FILE, _weights_bytes(module, job))}
    flags: list[str] = [f"seed={job.seed}"]
    if options.compiled:
        form = input_form(ir, job.interface)
        bundle, variant_flags = _aot_compile(module, form, job, options)
        files[COMPILED_FILE] = _write(out_dir / COMPILED_FILE, bundle)
        flags += variant_flags

    record = CompilationRecord(
        pipeline=job.pipeline, compilation_seconds=round(time.perf_counter() - started, 3),
        peak_memory_gb=round(_peak_memory_gb(job.device), 4), toolchain_version=str(toolchain),
        optimization_flags=flags)
    result = CompileResult(files=files, record=record, toolchain=toolchain,
                           kernel_artifact_id=kernel_id, target=target)
    atomic_write_text(out_dir / RESULT_FILE, result.to_json())
    return result


def _weights_bytes(module, job: CompileJob) -> bytes:
    from safetensors.torch import save

    state = {name: tensor.detach().to("cpu").contiguous()
             for name, tensor in module.state_dict().items()}
    return save(state, metadata={"blueprint_id": job.blueprint_id, "interface": str(job.interface),
                                 "dtype": job.dtype, "seed": str(job.seed)})


def _aot_compile(module, form: InputForm, job: CompileJob,
                 options: PipelineOptions) -> tuple[bytes, list[str]]:
    """One AOT-compiled forward+backward per (bucket, input requires grad)."""
    import torch

    config = torch._dynamo.config
    if getattr(torch._inductor.config, "force_disable_caches", False):
        raise CompileError("torch._inductor.config.force_disable_caches is set (TORCHINDUCTOR_"
                           "FORCE_DISABLE_CACHES?); ahead-of-time compilation needs the caches")
    generator = torch.Generator().manual_seed(job.seed)
    variants: list[tuple[CompiledVariant, bytes]] = []
    with ExitStack() as tracing:
        # torch 2.11 attaches `.aot_compile` to the compiled function only when
        # enable_aot_compile is set (2.13 sets it by default).
        if hasattr(config, "enable_aot_compile"):
            tracing.enter_context(config.patch(enable_aot_compile=True))
        for setting in options.tracing:
            tracing.enter_context(_tracing_setting(setting))
        compiler = torch.compile(type(module).forward, fullgraph=True, dynamic=options.dynamic,
                                 mode=options.mode)
        aot_compile = getattr(compiler, "aot_compile", None)
        if aot_compile is None:
            raise CompileError(f"torch {torch.__version__} has no torch.compile(...).aot_compile; "
                               f"the {job.pipeline.value} pipeline needs torch >= 2.11")
        for leading in options.buckets[form]:
            shape = example_shape(form, leading, job.interface)
            for requires_grad in (True, False):
                x = torch.randn(shape, generator=generator)
                x = x.to(job.device, getattr(torch, job.dtype))
                x.requires_grad_(requires_grad)
                module.zero_grad(set_to_none=True)
                what = (f"{job.pipeline.value} pipeline, input {list(shape)} "
                        f"requires_grad={requires_grad}")
                try:
                    compiled = aot_compile(((module, x), {}))
                    saved = type(compiled).serialize(compiled)
                except Exception as e:  # torch raises many types; the reason is what matters
                    raise CompileError(f"{what}: {type(e).__name__}: "
                                       f"{_first_line(e)}") from e
                if not compiled.guard_check(module, x):
                    raise CompileError(f"{what}: the compiled function rejects its own example")
                # 2.11+ returns AOTCompileSaveResult; earlier builds returned the bytes.
                payload = getattr(saved, "serialized_data", saved)
                variants.append((CompiledVariant(
                    form=form, example_shape=list(shape), input_requires_grad=requires_grad,
                    dynamic=options.dynamic, mode=options.mode, offset=0, length=len(payload)),
                    payload))
    flags = ["fullgraph", f"mode={options.mode or 'default'}",
             f"dynamic={str(options.dynamic).lower()}", *options.tracing,
             *(f"bucket={form}:{'x'.join(map(str, leading))}" for leading in options.buckets[form]),
             "input_requires_grad=true,false"]
    return write_bundle(torch.__version__, variants), flags


def _tracing_setting(name: str) -> AbstractContextManager:
    """The config patch behind each name in `PipelineOptions.tracing`."""
    import torch
    from torch.fx.experimental import _config as fx_config

    if name == "specialize_float":
        # The builder's float attributes (dropout p, norm eps, scale init) are constants.
        # Without it, dynamic=True tensorifies them and fullgraph capture aborts with
        # TensorifyScalarRestartAnalysis (torch 2.13, batch norm, dropout, attention).
        return torch._dynamo.config.patch(specialize_float=True)
    if name == "no_duck_shape":
        # By default dims of equal size share one symbol: a bucket of 1024 rows on a 1024-wide
        # interface was specialized to exactly 1024 rows, and 32x32 maps to square maps (seen on
        # an H100, torch 2.11). Each input dim gets its own symbol instead.
        return fx_config.patch(use_duck_shape=False)
    raise ValueError(f"unknown tracing setting {name!r}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _write(path: Path, data: bytes) -> str:
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _peak_memory_gb(device: str) -> float:
    """The compiling process's peak resident memory (Inductor compiles on the host), plus the
    device's peak allocation on a GPU."""
    import torch

    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    if torch.device(device).type == "cuda":
        return host + torch.cuda.max_memory_allocated(device) / 2**30
    return host

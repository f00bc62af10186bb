"""What a kernel was built with, and the names that follow from it: the device target, the
config hash and the kernel artifact id (`<ir-hash[:12]>-<target>-<pipeline>-<config-hash[:6]>`,
HLD J.5).

A compiled function is only valid where its toolchain is: torch checks the Python and torch
versions itself, and on a GPU the CUDA toolkit, the Triton version and the GPU's name
(`torch._dynamo.package.SystemInfo`); `Toolchain` records exactly those, plus, on the CPU, the
instruction set that Inductor's C++ kernels were vectorised for. The loader attaches a compiled
function only when the running toolchain has the same fingerprint.

torch is imported inside the functions that need it: the CLI imports this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from esper.contracts import (
    KERNEL_ID_PATTERN,
    CompilationPipeline,
    CompiledKernelArtifact,
    KernelInterface,
)
from esper.errors import BadInputError

# Words in a GPU's marketing name that say nothing about the chip.
_VENDOR_WORDS = frozenset({"nvidia", "tesla", "geforce", "quadro", "amd", "instinct", "radeon",
                           "graphics", "device", "pro"})
_TARGET = re.compile(r"[a-z][a-z0-9]{1,15}")
_KERNEL_ID = re.compile(KERNEL_ID_PATTERN)


@dataclass(frozen=True)
class Toolchain:
    """The software and hardware a compiled function depends on. None: not used on this target
    (Triton, CUDA and the GPU on the CPU; the CPU's vector ISA on a GPU)."""

    python: str
    torch: str
    triton: str | None
    cuda: str | None
    gpu_name: str | None
    cpu_capability: str | None = None

    def to_jsonable(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)

    @classmethod
    def from_jsonable(cls, obj: Any, *, source: str = "toolchain") -> Toolchain:
        names = [f.name for f in dataclasses.fields(cls)]
        required = names[:5]
        if not isinstance(obj, dict) or set(obj) - set(names) or set(required) - set(obj):
            raise BadInputError(f"{source}: a toolchain is an object with the keys "
                                f"{', '.join(names)}")
        for key, value in obj.items():
            if key in ("python", "torch") and not (isinstance(value, str) and value):
                raise BadInputError(f"{source}: field '{key}' must be a non-empty string")
            if value is not None and not isinstance(value, str):
                raise BadInputError(f"{source}: field '{key}' must be a string or null")
        return cls(**obj)

    def canonical_json(self) -> bytes:
        return json.dumps(self.to_jsonable(), sort_keys=True, separators=(",", ":")).encode()

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON: equal fingerprints, interchangeable toolchains."""
        return hashlib.sha256(self.canonical_json()).hexdigest()

    def differences(self, other: Toolchain) -> list[str]:
        """`field: mine != other's`, one per field that differs (for fallback reasons)."""
        return [f"{f.name} {getattr(self, f.name)} != {getattr(other, f.name)}"
                for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    def __str__(self) -> str:
        parts = [f"python {self.python}", f"torch {self.torch}"]
        parts += [f"{f.name} {getattr(self, f.name)}" for f in dataclasses.fields(self)[2:]
                  if getattr(self, f.name) is not None]
        return ", ".join(parts)


@cache
def current_toolchain(device: str) -> Toolchain:
    """The toolchain this process would compile with (or run compiled code with) on `device`."""
    import torch

    dev = _parse_device(device)
    if dev.type == "cpu":
        return Toolchain(python=platform.python_version(), torch=torch.__version__, triton=None,
                         cuda=None, gpu_name=None,
                         cpu_capability=torch.backends.cpu.get_cpu_capability())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return Toolchain(python=platform.python_version(), torch=torch.__version__,
                     triton=triton_version, cuda=torch.version.cuda or torch.version.hip,
                     gpu_name=torch.cuda.get_device_name(dev))


def device_target(device: str) -> str:
    """The target name of `device` in kernel ids: `cpu`, or the GPU's chip (`h100`, `a100`,
    `rtx4090`), else its compute capability (`sm90`)."""
    import torch

    dev = _parse_device(device)
    if dev.type == "cpu":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(dev)
    return gpu_target(torch.cuda.get_device_name(dev), (major, minor))


def gpu_target(name: str, capability: tuple[int, int]) -> str:
    """`NVIDIA H100 80GB HBM3` -> `h100`, `NVIDIA GeForce RTX 4090` -> `rtx4090`,
    `AMD Instinct MI300X` -> `mi300x`; a name with no model number -> `sm{major}{minor}`."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t and t not in _VENDOR_WORDS]
    for i, token in enumerate(tokens):
        if not any(c.isdigit() for c in token):
            continue
        if token.isdigit() and i > 0 and tokens[i - 1].isalpha():
            token = tokens[i - 1] + token  # "rtx 4090"
        if _TARGET.fullmatch(token):
            return token
        break
    return f"sm{capability[0]}{capability[1]}"


def _parse_device(device: str):
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInputError(f"bad device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise BadInputError(f"device {device!r}: the forge compiles for cpu and cuda only")
    if not torch.cuda.is_available():
        raise BadInputError(f"device {device!r}: CUDA is not available in this process")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise BadInputError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA "
                            "devices")
    return dev


# Pipelines ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineOptions:
    """How one pipeline compiles. `buckets`: for each input form, the leading dims of the
    example inputs (the feature or channel dim comes from the interface): `rows` (N, IN) for
    position-wise linear blueprints, `sequence` (B, T, IN) for attention, `maps` (B, IN, H, W)
    for conv, as (N,), (B, T) and (B, H, W). Each bucket is compiled with dynamic shapes, twice:
    for an input that requires grad and for one that does not (a seed in TRAINING reads a
    detached input; from GRAFTING on, the host's input carries grad). Rationale and measured
    coverage: docs/forge-compile-api.md."""

    compiled: bool
    mode: str | None = None  # torch.compile mode; None is the default
    dynamic: bool = True
    buckets: dict[str, tuple[tuple[int, ...], ...]] = dataclasses.field(default_factory=dict)
    # Tracing settings, applied by compile.py while it traces (see there for why each one).
    tracing: tuple[str, ...] = ("specialize_float", "no_duck_shape")

    def to_jsonable(self) -> dict[str, Any]:
        return {"compiled": self.compiled, "mode": self.mode, "dynamic": self.dynamic,
                "buckets": {form: [list(b) for b in shapes]
                            for form, shapes in sorted(self.buckets.items())},
                "tracing": list(self.tracing) if self.compiled else []}


PIPELINE_OPTIONS: dict[CompilationPipeline, PipelineOptions] = {
    CompilationPipeline.FAST: PipelineOptions(compiled=False),
    CompilationPipeline.STANDARD: PipelineOptions(
        compiled=True, mode=None, dynamic=True,
        buckets={"rows": ((1024,),), "sequence": ((8, 128),), "maps": ((8, 32, 32),)}),
    CompilationPipeline.AGGRESSIVE: PipelineOptions(
        compiled=True, mode="max-autotune", dynamic=True,
        buckets={"rows": ((1024,), (16384,)), "sequence": ((8, 128), (4, 1024)),
                 "maps": ((8, 32, 32), (8, 16, 16), (8, 8, 8))}),
}


@cache
def builder_digest() -> str:
    """sha256 of the blueprint builder's source. A compiled function runs the builder's
    `forward` as it was traced; if the builder changes, the kernel's id changes with it and the
    loader runs the eager module instead of the stale compiled code."""
    source = (resources.files("esper.blueprints") / "builder.py").read_bytes()
    return hashlib.sha256(source).hexdigest()


def config_hash(toolchain: Toolchain, interface: KernelInterface, dtype: str,
                pipeline: CompilationPipeline) -> str:
    """sha256 hex over everything that decides the bytes of an artifact besides the IR and the
    seed: the toolchain, the interface, the dtype, the pipeline's options and the builder."""
    pipeline = CompilationPipeline(pipeline)
    payload = {
        "toolchain": toolchain.fingerprint(),
        "interface": interface.to_jsonable(),
        "dtype": dtype,
        "pipeline": pipeline.value,
        "options": PIPELINE_OPTIONS[pipeline].to_jsonable(),
        "builder": builder_digest(),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def kernel_artifact_id(blueprint_id: str, target: str, pipeline: CompilationPipeline,
                       config_hash: str) -> str:
    pipeline = CompilationPipeline(pipeline)
    kernel_id = f"{blueprint_id[:12]}-{target}-{pipeline.value}-{config_hash[:6]}"
    if not _KERNEL_ID.fullmatch(kernel_id):
        raise BadInputError(f"cannot make a kernel id from blueprint {blueprint_id!r}, target "
                            f"{target!r} and config hash {config_hash!r}")
    return kernel_id


def kernel_is_stale(artifact: CompiledKernelArtifact, toolchain: Toolchain) -> bool:
    """True when `artifact` would get another id if it were compiled now with `toolchain` (a new
    torch, Triton, CUDA, GPU, pipeline options or builder): the forge's recompile candidates.
    `toolchain_hash` of an artifact sealed by the forge is its full config hash."""
    now = config_hash(toolchain, artifact.interface, artifact.dtype,
                      artifact.compilation_pipeline)
    return not now.startswith(artifact.toolchain_hash)

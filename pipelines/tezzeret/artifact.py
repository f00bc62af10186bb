"""Sealing a compiled artifact: its files into Urza's store, a manifest that names them by hash,
signed with the forge key (DESIGN.md sections 5 and 8).

The manifest is the artifact's root of trust: the kernel row's `kernel_binary_ref` is the hash
of the signed manifest document, the manifest holds the hash of every file, and the blueprint's
id is the hash of its IR. Verifying the one signature and following the hashes verifies every
byte a loader deserializes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, model_validator

from esper.contracts import (
    CompilationPipeline,
    CompilationRecord,
    CompiledKernelArtifact,
    KernelInterface,
    VersionedContract,
)
from esper.contracts.assets import DeviceTarget, KernelArtifactId
from esper.contracts.base import Sha256Hex, Timestamp, describe_validation_error, utcnow
from esper.errors import BadInputError, IntegrityError
from pipelines.tezzeret.compile import (
    COMPILED_FILE,
    WEIGHTS_FILE,
    CompileJob,
    CompileResult,
)
from pipelines.tezzeret.toolchain import (
    Toolchain,
    builder_digest,
    config_hash,
    kernel_artifact_id,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from esper.urza import Urza

SIGNER = "tezzeret"
FileName = Literal["weights.safetensors", "compiled.bin"]


class Manifest(VersionedContract):
    """What the forge vouches for, signed with its key: ids, interface, target, toolchain and the
    hash of every file of one kernel artifact."""

    kernel_artifact_id: KernelArtifactId
    blueprint_id: Sha256Hex
    interface: KernelInterface
    target: DeviceTarget
    dtype: Literal["float32", "bfloat16", "float16"]
    pipeline: CompilationPipeline
    toolchain: dict[str, str | None]
    toolchain_fingerprint: Sha256Hex
    config_hash: Sha256Hex
    builder_digest: Sha256Hex = Field(description="sha256 of the builder that traced the module")
    seed: int = Field(ge=0)
    files: dict[FileName, Sha256Hex]
    compilation: CompilationRecord
    created_at: Timestamp = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _files_fit_the_pipeline(self) -> Manifest:
        expected = {WEIGHTS_FILE} | ({COMPILED_FILE} if self.compiled else set())
        if set(self.files) != expected:
            raise ValueError(f"a {self.pipeline.value} artifact has the files "
                             f"{', '.join(sorted(expected))}")
        return self

    @property
    def compiled(self) -> bool:
        return self.pipeline is not CompilationPipeline.FAST

    def toolchain_record(self) -> Toolchain:
        return Toolchain.from_jsonable(self.toolchain,
                                       source=f"manifest of {self.kernel_artifact_id}")

    def canonical_json(self) -> bytes:
        return json.dumps(self.to_jsonable(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")


def seal(job: CompileJob, result: CompileResult, out_dir: Path, urza: Urza,
         forge_key: Ed25519PrivateKey) -> CompiledKernelArtifact:
    """Store the files of a finished compile and its signed manifest; return the
    PENDING_BENCHMARKING artifact for `urza.add_kernel` (which the caller does).

    Every file is re-read and re-hashed here, in the parent: a file that does not match what the
    child reported is an IntegrityError and nothing is signed.
    """
    out_dir = Path(out_dir)
    digest = config_hash(result.toolchain, job.interface, job.dtype, job.pipeline)
    expected_id = kernel_artifact_id(job.blueprint_id, result.target, job.pipeline, digest)
    if result.kernel_artifact_id != expected_id:
        raise IntegrityError(f"compile result names kernel {result.kernel_artifact_id}; its job "
                             f"and toolchain make {expected_id}")
    if result.record.pipeline is not job.pipeline:
        raise IntegrityError(f"compile result is for the {result.record.pipeline.value} pipeline, "
                             f"the job for {job.pipeline.value}")
    blobs: dict[str, bytes] = {}
    for name, reported in sorted(result.files.items()):
        path = out_dir / name
        if path.parent != out_dir:
            raise BadInputError(f"compile result names a file outside its directory: {name!r}")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{name}: listed in the compile result but not in "
                                 f"{out_dir}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != reported:
            raise IntegrityError(f"{name}: hashes to {actual}; the compile result says {reported}")
        blobs[name] = data
    from esper.signing import sign

    manifest = _manifest(job, result, digest)  # checks the file set before anything is stored
    for data in blobs.values():
        urza.store.put(data)
    document = sign(manifest.canonical_json(), forge_key, signer=SIGNER)
    manifest_ref = urza.store.put(document)
    return CompiledKernelArtifact(
        id=manifest.kernel_artifact_id, blueprint_id=job.blueprint_id,
        compilation_pipeline=job.pipeline, interface=job.interface, target=result.target,
        dtype=job.dtype, toolchain_hash=digest, kernel_binary_ref=manifest_ref,
        compilation=result.record, created_at=manifest.created_at)


def _manifest(job: CompileJob, result: CompileResult, digest: str) -> Manifest:
    fields: dict[str, Any] = {
        "kernel_artifact_id": result.kernel_artifact_id, "blueprint_id": job.blueprint_id,
        "interface": job.interface, "target": result.target, "dtype": job.dtype,
        "pipeline": job.pipeline, "toolchain": result.toolchain.to_jsonable(),
        "toolchain_fingerprint": result.toolchain.fingerprint(), "config_hash": digest,
        "builder_digest": builder_digest(), "seed": job.seed, "files": dict(result.files),
        "compilation": result.record}
    try:
        return Manifest.model_validate(fields)
    except ValidationError as e:
        raise BadInputError(describe_validation_error(
            e, "manifest", f"kernel {result.kernel_artifact_id}")) from None

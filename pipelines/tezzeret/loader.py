"""Loading a kernel artifact: verify everything, then rebuild it (used by Kasmina and Urabrask).

    kernel = load_kernel(urza, kernel_id, device="cuda")   # IntegrityError (exit 3) if anything
    y = kernel(x)                                            # is off; forward and backward work

The order is the whole point: the manifest blob is read once and checked against its hash, its
signature verified against the workspace's forge key, and the manifest parsed from those very
bytes; every file is read once, checked against the hash in the manifest, and only then handed
to a deserializer (safetensors for weights, torch's `load_compiled_function` for compiled
code). The module is rebuilt from the IR, whose hash is the blueprint id. A compiled function
is attached only if it was built with the running toolchain and builder; otherwise the eager
module runs and `fallback_reason` says why (logged once).

With `require_validated` (Kasmina's use) the kernel must be VALIDATED by a report that verifies
against the workspace's bench key.

What is not redone per load (each only ever keyed by bytes that were just verified): parsing a
public key (cached by the key file's exact bytes, which are re-read every load, so a replaced key
takes effect at once), parsing and checking the blueprint IR (cached by its blueprint id, the
hash its bytes were just checked against, and the interface), and drawing initial weights that
the signed weights then overwrite (the module is built on the meta device and takes the loaded
tensors). Every blob is still read and hashed on every load.

torch, the catalog and the signing library are imported when a kernel is loaded: the CLI and the
GPU check script import this module.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
from collections.abc import Callable
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
from pipelines.tezzeret.toolchain import builder_digest, current_toolchain, device_target

if TYPE_CHECKING:
    import torch
    from torch import nn

    from esper.urza import Urza

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
    from esper.signing import open_signed

    artifact = urza.get_kernel(kernel_id)
    if require_validated:
        _require_validated(urza, artifact)

    what = f"kernel {artifact.id}"
    document = _blob(urza, artifact.kernel_binary_ref, f"{what}: manifest")
    body = open_signed(document, _trusted_key(urza, "forge"), what=f"{what}: manifest")
    try:
        manifest = Manifest.from_json(body, source=f"{what}: signed manifest")
    except BadInputError as e:
        raise IntegrityError(str(e)) from None
    _check_manifest_matches(manifest, artifact)

    files = {name: _blob(urza, digest, f"{what}: {name}")
             for name, digest in manifest.files.items()}
    ir_bytes = _blob(urza, manifest.blueprint_id, f"{what}: blueprint IR")
    ir, skeleton = _checked_blueprint(manifest.blueprint_id, str(manifest.interface), ir_bytes)
    module = _rebuild(skeleton, manifest, files[WEIGHTS_FILE], device, what)

    compiled, reason = None, None
    if manifest.compiled and attach:
        reason = _compiled_mismatch(manifest, device)
        if reason is None:
            try:
                compiled = attach_compiled(module, input_form(ir, manifest.interface),
                                           files[COMPILED_FILE])
            except IntegrityError:
                raise
            except Exception as e:  # verified bytes that this process cannot run
                reason = f"the compiled function does not load here ({type(e).__name__}: {e})"
        if reason is not None and (artifact.id, reason) not in _logged_fallbacks:
            _logged_fallbacks.add((artifact.id, reason))
            log.warning("%s: running the eager module: %s", what, reason)
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

def _blob(urza: Urza, digest: str, what: str) -> bytes:
    try:
        return urza.store.get(digest)
    except NotFoundError as e:
        raise IntegrityError(f"{what}: missing from the artifact store ({e})") from None
    except IntegrityError as e:
        raise IntegrityError(f"{what}: {e}") from None


def _check_manifest_matches(manifest: Manifest, artifact: CompiledKernelArtifact) -> None:
    """The signed manifest must describe the very kernel the catalog row names."""
    pairs = {
        "kernel id": (manifest.kernel_artifact_id, artifact.id),
        "blueprint": (manifest.blueprint_id, artifact.blueprint_id),
        "interface": (str(manifest.interface), str(artifact.interface)),
        "target": (manifest.target, artifact.target),
        "dtype": (manifest.dtype, artifact.dtype),
        "pipeline": (manifest.pipeline.value, artifact.compilation_pipeline.value),
    }
    for field, (signed, catalog) in pairs.items():
        if signed != catalog:
            raise IntegrityError(f"kernel {artifact.id}: the signed manifest says {field} "
                                 f"{signed}; the catalog says {catalog}")
    if not manifest.config_hash.startswith(artifact.toolchain_hash):
        raise IntegrityError(f"kernel {artifact.id}: the catalog's toolchain hash "
                             f"{artifact.toolchain_hash} is not the signed config hash")


def _require_validated(urza: Urza, artifact: CompiledKernelArtifact) -> None:
    from esper.signing import open_signed

    if artifact.status is not KernelStatus.VALIDATED:
        reason = f" ({artifact.status_reason})" if artifact.status_reason else ""
        raise KernelNotValidatedError(f"kernel {artifact.id} is {artifact.status.value}"
                                      f"{reason}; only VALIDATED kernels are loaded")
    # The catalog's report row points at the signed document in the store; the report is
    # re-verified against the bench key here, not taken from the row.
    row = urza.db.execute(
        "SELECT r.signed_blob FROM kernels k JOIN validation_reports r"
        " ON r.id = k.validation_report_id WHERE k.id = ?", (artifact.id,)).fetchone()
    if row is None:
        raise IntegrityError(f"kernel {artifact.id} is VALIDATED without a validation report")
    what = f"kernel {artifact.id}: validation report"
    body = open_signed(_blob(urza, row[0], what), _trusted_key(urza, "bench"), what=what)
    try:
        report = UrabraskValidationReport.from_json(body, source=what)
    except BadInputError as e:
        raise IntegrityError(str(e)) from None
    if report.kernel_artifact_id != artifact.id or report.blueprint_id != artifact.blueprint_id:
        raise IntegrityError(f"{what}: the signed report is for kernel {report.kernel_artifact_id}")
    if not report.passed_validation:
        raise IntegrityError(f"{what}: the signed report did not pass the kernel")


def _trusted_key(urza: Urza, role: str):
    """The workspace's public key for `role` (as `Workspace.public_key`): its file is read on
    every call and parsed once per distinct content."""
    path = urza.workspace.public_key_path(role)
    key = _parse_public_key(path.read_bytes())
    if key is None:
        raise IntegrityError(f"{path}: not an Ed25519 public key")
    return key


@functools.lru_cache(maxsize=16)
def _parse_public_key(pem: bytes):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = serialization.load_pem_public_key(pem)
    return key if isinstance(key, Ed25519PublicKey) else None


@functools.lru_cache(maxsize=256)
def _checked_blueprint(blueprint_id: str, interface: str, ir_bytes: bytes):
    """(IR, module skeleton): the parsed IR and the blueprint's module at `interface` on the
    meta device (no weights drawn), the module `esper.blueprints.build` makes before its
    initialisation. `ir_bytes` hashed to `blueprint_id` when read from the store; an IR that does
    not pass the static check raises (and is not cached)."""
    import torch

    from esper.blueprints import BlueprintModule, validate

    ir = load_ir(ir_bytes, source=f"blueprint {blueprint_id[:12]}")
    face = KernelInterface.parse(interface)
    result = validate(ir, face)
    with torch.device("meta"):
        return ir, BlueprintModule(ir, face, result.checks[0].nodes, result.blueprint_id,
                                   result.zero_init_node)


def _fresh(skeleton: nn.Module) -> nn.Module:
    """A new module shaped like `skeleton`, sharing no container with it: each module a new
    instance with the skeleton's attributes, each of its dicts and sets (parameters, buffers,
    submodules, hooks) copied, so that assigning tensors or registering hooks on the copy leaves
    the cached skeleton as it is. (Building anew on the meta device runs every initialiser
    through the device mode; `copy.deepcopy` costs as much.)"""
    cls = type(skeleton)
    module = cls.__new__(cls)
    state = {name: value.copy() if isinstance(value, (dict, set)) else value
             for name, value in skeleton.__dict__.items()}
    children = state["_modules"]
    for name, child in children.items():
        if child is not None:
            children[name] = _fresh(child)
    module.__dict__.update(state)
    return module


def clear_caches() -> None:
    """Forget parsed keys and checked blueprints (benchmarks time a first load with this)."""
    _parse_public_key.cache_clear()
    _checked_blueprint.cache_clear()


def _rebuild(skeleton: nn.Module, manifest: Manifest, weights: bytes, device: str,
             what: str) -> nn.Module:
    """A fresh copy of the meta `skeleton` given the signed weights, on `device` in the
    manifest's dtype (no initial weights are drawn only to be overwritten)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(weights)
    except SafetensorError as e:
        raise IntegrityError(f"{what}: {WEIGHTS_FILE} is not a safetensors file ({e})") from None
    module = _fresh(skeleton)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise IntegrityError(f"{what}: {WEIGHTS_FILE} does not fit the blueprint: "
                             f"{str(e).splitlines()[0]}") from None
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        raise IntegrityError(f"{what}: {WEIGHTS_FILE} does not fill every tensor of the blueprint")
    return module.to(device=device, dtype=getattr(torch, manifest.dtype))


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
    goes through `load_kernel` with `require_validated`, so only a VALIDATED kernel whose forge
    and bench signatures and file hashes all verify ever reaches a model.

    Kasmina runs loads on worker threads and a catalog connection belongs to one thread, so each
    thread that loads keeps its own connection, opened on its first load (opening and closing
    one per load cost about half of a load). `close()` closes the calling thread's connection; a
    worker thread's goes with the thread. Kasmina's seed banks run the eager module (batched with
    vmap), so a compiled function, if any, is verified but not deserialized.
    """

    def __init__(self, workspace) -> None:
        self.workspace = workspace
        self._local = threading.local()

    def load(self, kernel_artifact_id: str, device) -> nn.Module:
        return load_kernel(self._urza(), kernel_artifact_id, device=str(device),
                           require_validated=True, attach=False).module

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

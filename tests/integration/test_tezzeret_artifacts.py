"""Fast kernel artifacts end to end on a real workspace: compile, seal, register, verify, load.

The loader must give back exactly the module the builder makes from the same IR and seed (output
exactly zero at init), refuse any tampered byte with an IntegrityError that names the file, and,
for Kasmina, refuse kernels that a bench-signed report has not validated.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esper.blueprints import build, canonical_json, standard_library
from esper.contracts import (
    CompilationPipeline,
    KernelInterface,
    KernelStatus,
    UrabraskValidationReport,
)
from esper.errors import IntegrityError
from esper.signing import sign
from esper.urza import Urza
from pipelines.tezzeret.artifact import Manifest, seal
from pipelines.tezzeret.compile import CompileJob, compile_job
from pipelines.tezzeret.loader import KernelNotValidatedError, load_kernel

LIBRARY = {ir.name: ir for ir in standard_library()}
SEED = 7


@pytest.fixture
def urza(workspace):
    with Urza.open(workspace) as u:
        yield u


def forge(urza: Urza, tmp_path: Path, name: str, interface: str,
          pipeline: CompilationPipeline = CompilationPipeline.FAST, dtype: str = "float32"):
    """What the forge does for one job, in-process: compile, seal, register."""
    ir = LIBRARY[name]
    blueprint, _ = urza.add_blueprint(canonical_json(ir), name=ir.name,
                                      interface_kind=ir.interface_kind, origin="library",
                                      actor="test")
    job = CompileJob(blueprint_id=blueprint.id, ir_json=urza.blueprint_ir(blueprint.id),
                     interface=KernelInterface.parse(interface), device="cpu", dtype=dtype,
                     pipeline=pipeline, seed=SEED)
    out = tmp_path / f"{name}-{interface.replace(':', '_')}-{dtype}"
    result = compile_job(job, out)
    artifact = seal(job, result, out, urza, urza.workspace.private_key("forge"))
    added, created = urza.add_kernel(artifact, actor="forge")
    assert created and added.status is KernelStatus.PENDING_BENCHMARKING
    return added, job, result


def example_input(name: str, interface: KernelInterface,
                  generator: torch.Generator) -> torch.Tensor:
    if interface.kind.value == "conv2d":
        return torch.randn(2, interface.in_features, 9, 11, generator=generator)
    if LIBRARY[name].needs_sequence:
        return torch.randn(3, 7, interface.in_features, generator=generator)
    return torch.randn(5, interface.in_features, generator=generator)


def validate(urza: Urza, kernel_id: str, blueprint_id: str, *, key_role: str = "bench") -> None:
    report = UrabraskValidationReport(kernel_artifact_id=kernel_id, blueprint_id=blueprint_id,
                                      passed_validation=True,
                                      benchmark_results={"latency_ms_mean": 0.05})
    document = sign(report.to_json().encode(), urza.workspace.private_key(key_role),
                    signer="urabrask")
    urza.apply_validation_report(document, actor="bench")


def tamper(urza: Urza, digest: str, position: int = -2) -> None:
    """Flip one byte of a stored blob in place (blobs are written read-only)."""
    path = urza.store.path_for(digest)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("name", "interface"), [
    ("mlp_relu_w16", "linear:37:11"),
    ("swiglu_w32", "linear:64:32"),
    ("low_rank_r4", "linear:37:11"),
    ("sigmoid_gated_linear", "linear:37:11"),
    ("attention_head_d16", "linear:37:11"),
    ("conv3x3_relu_w16", "conv2d:6:10:2"),
    ("bottleneck_bn_relu_w8", "conv2d:6:10:2"),
    ("depthwise_separable_relu", "conv2d:6:10:1"),
])
def test_fast_artifacts_seal_verify_and_load_as_built(urza, tmp_path, name, interface):
    artifact, job, result = forge(urza, tmp_path, name, interface)
    assert artifact.id == result.kernel_artifact_id
    assert artifact.toolchain_hash[:6] == artifact.id[-6:]
    report = urza.verify()
    assert report.ok, report.problems

    kernel = load_kernel(urza, artifact.id, require_validated=False)
    assert kernel.compiled is None and kernel.fallback_reason is None
    assert kernel.manifest.files.keys() == {"weights.safetensors"}
    fresh = build(LIBRARY[name], job.interface, seed=SEED)
    assert kernel.module.state_dict().keys() == fresh.state_dict().keys()
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(kernel.module.state_dict()[key], tensor), key

    generator = torch.Generator().manual_seed(0)
    x = example_input(name, job.interface, generator)
    x_fresh = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    y, y_fresh = kernel(x), fresh(x_fresh)
    assert torch.equal(y, y_fresh)
    assert not y.any(), "the last layer starts at zero: a graft is function-preserving"
    weight = torch.randn(y.shape, generator=generator)
    (y * weight).sum().backward()
    (y_fresh * weight).sum().backward()
    for (key, p), p_fresh in zip(kernel.module.named_parameters(), fresh.parameters()):
        assert (p.grad is None) == (p_fresh.grad is None), key
        if p.grad is not None:
            assert torch.equal(p.grad, p_fresh.grad), key
    # At init only the zeroed output layer learns (its input is nonzero).
    assert any(p.grad is not None and p.grad.any() for p in kernel.module.parameters())


def test_kernels_of_one_blueprint_differ_by_interface_and_all_verify(urza, tmp_path):
    ids = {forge(urza, tmp_path, "mlp_gelu_w8", face)[0].id
           for face in ("linear:37:11", "linear:37:12", "linear:128:96")}
    assert len(ids) == 3
    assert urza.verify().ok


@pytest.mark.parametrize("what", ["manifest", "weights.safetensors", "blueprint IR"])
def test_one_tampered_byte_is_refused(urza, tmp_path, what):
    artifact, _, _ = forge(urza, tmp_path, "mlp_relu_w16", "linear:37:11")
    manifest = load_kernel(urza, artifact.id, require_validated=False).manifest
    digest = {"manifest": artifact.kernel_binary_ref,
              "weights.safetensors": manifest.files["weights.safetensors"],
              "blueprint IR": artifact.blueprint_id}[what]
    tamper(urza, digest)
    with pytest.raises(IntegrityError, match=what) as e:
        load_kernel(urza, artifact.id, require_validated=False)
    assert e.value.exit_code == 3
    assert not urza.verify().ok


def test_a_manifest_signed_by_another_key_is_refused(urza, tmp_path):
    artifact, _, _ = forge(urza, tmp_path, "mlp_relu_w16", "linear:37:11")
    body = load_kernel(urza, artifact.id, require_validated=False).manifest.canonical_json()
    forged = urza.store.put(sign(body, urza.workspace.private_key("bench"), signer="tezzeret"))
    impostor = artifact.model_copy(update={"id": artifact.id[:-6] + "000000",
                                           "kernel_binary_ref": forged})
    urza.add_kernel(impostor, actor="mallory")
    with pytest.raises(IntegrityError, match="not the trusted key"):
        load_kernel(urza, impostor.id, require_validated=False)


def test_a_genuine_manifest_under_another_kernel_row_is_refused(urza, tmp_path):
    small, _, _ = forge(urza, tmp_path, "mlp_relu_w16", "linear:37:11")
    wide = small.model_copy(update={"id": small.id[:-6] + "ffffff",
                                    "interface": KernelInterface.parse("linear:37:12")})
    urza.add_kernel(wide, actor="mallory")  # points at the small kernel's signed manifest
    with pytest.raises(IntegrityError, match="signed manifest says kernel id"):
        load_kernel(urza, wide.id, require_validated=False)


def test_the_manifest_is_strict_and_names_every_file(urza, tmp_path):
    artifact, _, result = forge(urza, tmp_path, "glu_w16", "linear:37:11")
    manifest = load_kernel(urza, artifact.id, require_validated=False).manifest
    assert manifest.files == result.files
    assert manifest.toolchain == result.toolchain.to_jsonable()
    assert manifest.config_hash == artifact.toolchain_hash
    assert Manifest.from_json(manifest.canonical_json()) == manifest


def test_seal_refuses_a_file_that_changed_after_the_compile(urza, tmp_path):
    ir = LIBRARY["mlp_relu_w16"]
    blueprint, _ = urza.add_blueprint(canonical_json(ir), name=ir.name,
                                      interface_kind=ir.interface_kind, actor="test")
    job = CompileJob(blueprint_id=blueprint.id, ir_json=urza.blueprint_ir(blueprint.id),
                     interface=KernelInterface.parse("linear:37:11"), device="cpu",
                     dtype="float32", pipeline=CompilationPipeline.FAST)
    result = compile_job(job, tmp_path / "out")
    blobs_before = set(urza.store.iter_hashes())
    weights = tmp_path / "out" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    with pytest.raises(IntegrityError, match="weights.safetensors"):
        seal(job, result, tmp_path / "out", urza, urza.workspace.private_key("forge"))
    assert set(urza.store.iter_hashes()) == blobs_before  # nothing stored, nothing signed


def test_compile_refuses_an_ir_that_is_not_its_blueprint(tmp_path):
    ir_json = canonical_json(LIBRARY["mlp_relu_w16"])
    job = CompileJob(blueprint_id="0" * 64, ir_json=ir_json,
                     interface=KernelInterface.parse("linear:37:11"), device="cpu",
                     dtype="float32", pipeline=CompilationPipeline.FAST)
    with pytest.raises(IntegrityError, match="hashes to"):
        compile_job(job, tmp_path / "out")
    assert not (tmp_path / "out" / "result.json").exists()


def test_kasmina_loads_only_bench_validated_kernels(urza, tmp_path):
    artifact, _, _ = forge(urza, tmp_path, "mlp_relu_w16", "linear:37:11")
    with pytest.raises(KernelNotValidatedError, match="PENDING_BENCHMARKING") as e:
        load_kernel(urza, artifact.id)
    assert e.value.exit_code == 1

    validate(urza, artifact.id, artifact.blueprint_id)
    kernel = load_kernel(urza, artifact.id)
    assert kernel.artifact.status is KernelStatus.VALIDATED

    report_blob = urza.db.execute("SELECT signed_blob FROM validation_reports").fetchone()[0]
    tamper(urza, report_blob, position=len(urza.store.get(report_blob)) // 2)
    with pytest.raises(IntegrityError, match="validation report"):
        load_kernel(urza, artifact.id)


def test_a_rejected_kernel_is_not_loaded_for_training(urza, tmp_path):
    artifact, _, _ = forge(urza, tmp_path, "mlp_relu_w16", "linear:37:11")
    report = UrabraskValidationReport(kernel_artifact_id=artifact.id,
                                      blueprint_id=artifact.blueprint_id, passed_validation=False,
                                      rejection_reason="NaN in backward", benchmark_results={})
    urza.apply_validation_report(sign(report.to_json().encode(),
                                      urza.workspace.private_key("bench"), signer="urabrask"),
                                 actor="bench")
    with pytest.raises(KernelNotValidatedError, match="REJECTED"):
        load_kernel(urza, artifact.id)
    assert load_kernel(urza, artifact.id, require_validated=False).module is not None


def test_a_compiled_pipeline_that_cannot_be_built_fails_alone_with_its_reason(urza, tmp_path):
    """The child exits non-zero with one line saying why, and leaves no result.json; the fast
    artifact of the same blueprint is unaffected."""
    ir = LIBRARY["mlp_relu_w16"]
    blueprint, _ = urza.add_blueprint(canonical_json(ir), name=ir.name,
                                      interface_kind=ir.interface_kind, actor="test")
    job = CompileJob(blueprint_id=blueprint.id, ir_json=urza.blueprint_ir(blueprint.id),
                     interface=KernelInterface.parse("linear:37:11"), device="cpu",
                     dtype="float32", pipeline=CompilationPipeline.STANDARD)
    (tmp_path / "job.json").write_text(job.to_json())
    code = ("import sys; from pathlib import Path; "
            "from pipelines.tezzeret.compile import CompileJob, compile_job; "
            "compile_job(CompileJob.from_json(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))")
    root = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "job.json"), str(tmp_path / "out")],
        check=False, capture_output=True, text=True, timeout=120, cwd=root,
        env=dict(os.environ, PYTHONPATH=str(root), TORCHINDUCTOR_FORCE_DISABLE_CACHES="1"))
    assert child.returncode != 0
    assert "CompileError" in child.stderr and "force_disable_caches" in child.stderr
    assert not (tmp_path / "out" / "result.json").exists()
    fast, _, _ = forge(urza, tmp_path, "mlp_relu_w16", "linear:37:11")
    assert load_kernel(urza, fast.id, require_validated=False).module is not None


def test_a_bfloat16_kernel_loads_its_signed_weights_bit_for_bit(urza, tmp_path):
    from safetensors.torch import load

    artifact, _, _ = forge(urza, tmp_path, "layer_norm_mlp_gelu_w16", "linear:37:11",
                           dtype="bfloat16")
    kernel = load_kernel(urza, artifact.id, require_validated=False)
    signed = load(urza.store.get(kernel.manifest.files["weights.safetensors"]))
    state = kernel.module.state_dict()
    assert state.keys() == signed.keys()
    assert all(t.dtype is torch.bfloat16 and torch.equal(t, signed[k]) for k, t in state.items())


def test_the_load_record_is_the_catalog_row_in_one_query(urza, tmp_path):
    from esper.errors import NotFoundError

    artifact, _, _ = forge(urza, tmp_path, "mlp_relu_w16", "linear:37:11")
    record = urza.kernel_load_record(artifact.id[:16])  # a unique prefix, as get_kernel
    assert (record.id, record.blueprint_id, record.interface, record.target, record.dtype,
            record.pipeline, record.kernel_binary_ref, record.status, record.report_blob) == (
        artifact.id, artifact.blueprint_id, artifact.interface, artifact.target, artifact.dtype,
        artifact.compilation_pipeline, artifact.kernel_binary_ref, artifact.status, None)
    validate(urza, artifact.id, artifact.blueprint_id)
    report_blob = urza.db.execute("SELECT signed_blob FROM validation_reports").fetchone()[0]
    assert urza.kernel_load_record(artifact.id).report_blob == report_blob
    with pytest.raises(NotFoundError):
        urza.kernel_load_record("ffffffffffff-cpu-fast-000000")


def test_the_report_failure_is_the_one_raised_when_several_checks_fail(urza, tmp_path):
    """With the report, the manifest and the IR all tampered with, the failure raised is the
    first of the checks in their listed order: the report's."""
    artifact, _, _ = forge(urza, tmp_path, "mlp_relu_w16", "linear:37:11")
    validate(urza, artifact.id, artifact.blueprint_id)
    report_blob = urza.db.execute("SELECT signed_blob FROM validation_reports").fetchone()[0]
    tamper(urza, report_blob, position=len(urza.store.get(report_blob)) // 2)
    tamper(urza, artifact.kernel_binary_ref)
    tamper(urza, artifact.blueprint_id)
    for _ in range(5):
        with pytest.raises(IntegrityError, match="validation report"):
            load_kernel(urza, artifact.id)

"""The forge's names and formats: device targets, toolchains, config hashes, kernel ids, compile
jobs and results as JSON, and the compiled bundle's container format."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import pytest

from esper.blueprints import canonical_json, standard_library
from esper.contracts import (
    KERNEL_ID_PATTERN,
    CompilationPipeline,
    CompilationRecord,
    CompiledKernelArtifact,
    KernelInterface,
)
from esper.errors import BadInputError, IntegrityError
from pipelines.tezzeret.compile import (
    CompiledVariant,
    CompileJob,
    CompileResult,
    read_bundle,
    write_bundle,
)
from pipelines.tezzeret.toolchain import (
    Toolchain,
    config_hash,
    current_toolchain,
    device_target,
    gpu_target,
    kernel_artifact_id,
    kernel_is_stale,
)

TOOLCHAIN = Toolchain(python="3.12.3", torch="2.11.0+cu130", triton="3.6.0", cuda="13.0",
                      gpu_name="NVIDIA H100 80GB HBM3")
LINEAR = KernelInterface.parse("linear:37:11")


@pytest.mark.parametrize(("name", "capability", "target"), [
    ("NVIDIA H100 80GB HBM3", (9, 0), "h100"),
    ("NVIDIA H100 PCIe", (9, 0), "h100"),
    ("NVIDIA H200", (9, 0), "h200"),
    ("NVIDIA GH200 480GB", (9, 0), "gh200"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "a100"),
    ("Tesla V100-SXM2-16GB", (7, 0), "v100"),
    ("NVIDIA GeForce RTX 4090", (8, 9), "rtx4090"),
    ("NVIDIA L4", (8, 9), "l4"),
    ("NVIDIA B200", (10, 0), "b200"),
    ("AMD Instinct MI300X", (9, 4), "mi300x"),
    ("NVIDIA Graphics Device", (12, 0), "sm120"),
    ("", (8, 6), "sm86"),
])
def test_gpu_target_is_the_chip_name(name, capability, target):
    assert gpu_target(name, capability) == target
    assert re.fullmatch(r"[a-z0-9_]+", target)


def test_cpu_target_and_toolchain():
    import platform

    import torch

    assert device_target("cpu") == "cpu"
    toolchain = current_toolchain("cpu")
    assert toolchain.python == platform.python_version()
    assert toolchain.torch == torch.__version__
    # The CPU backend uses neither Triton nor CUDA: their versions must not split CPU artifacts.
    assert (toolchain.triton, toolchain.cuda, toolchain.gpu_name) == (None, None, None)
    assert toolchain.cpu_capability == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps"])
def test_unsupported_devices_are_bad_input(device):
    with pytest.raises(BadInputError):
        device_target(device)


def test_fingerprint_is_stable_and_sees_every_field():
    assert TOOLCHAIN.fingerprint() == dataclasses.replace(TOOLCHAIN).fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", TOOLCHAIN.fingerprint())
    for field in dataclasses.fields(Toolchain):
        changed = dataclasses.replace(TOOLCHAIN, **{field.name: "other"})
        assert changed.fingerprint() != TOOLCHAIN.fingerprint(), field.name
    assert Toolchain.from_jsonable(TOOLCHAIN.to_jsonable()) == TOOLCHAIN
    assert TOOLCHAIN.differences(dataclasses.replace(TOOLCHAIN, torch="2.13.0")) == [
        "torch 2.11.0+cu130 != 2.13.0"]


@pytest.mark.parametrize("bad", [[], {"python": "3.12"}, {**TOOLCHAIN.to_jsonable(), "x": "1"},
                                 {**TOOLCHAIN.to_jsonable(), "torch": 2.11}])
def test_malformed_toolchains_are_refused(bad):
    with pytest.raises(BadInputError):
        Toolchain.from_jsonable(bad)


def test_config_hash_separates_every_build_parameter():
    base = config_hash(TOOLCHAIN, LINEAR, "float32", CompilationPipeline.STANDARD)
    variants = [
        config_hash(dataclasses.replace(TOOLCHAIN, triton="3.7.0"), LINEAR, "float32",
                    CompilationPipeline.STANDARD),
        config_hash(TOOLCHAIN, KernelInterface.parse("linear:37:12"), "float32",
                    CompilationPipeline.STANDARD),
        config_hash(TOOLCHAIN, LINEAR, "bfloat16", CompilationPipeline.STANDARD),
        config_hash(TOOLCHAIN, LINEAR, "float32", CompilationPipeline.AGGRESSIVE),
    ]
    assert len({base, *variants}) == 5
    assert base == config_hash(TOOLCHAIN, LINEAR, "float32", CompilationPipeline.STANDARD)


def test_kernel_artifact_id_has_the_hld_shape():
    bp = "ab" * 32
    digest = config_hash(TOOLCHAIN, LINEAR, "float32", CompilationPipeline.FAST)
    kernel_id = kernel_artifact_id(bp, "h100", CompilationPipeline.FAST, digest)
    assert kernel_id == f"{bp[:12]}-h100-fast-{digest[:6]}"
    assert re.fullmatch(KERNEL_ID_PATTERN, kernel_id)
    with pytest.raises(BadInputError):
        kernel_artifact_id(bp, "H100!", CompilationPipeline.FAST, digest)


def test_a_kernel_is_stale_when_the_toolchain_moves():
    digest = config_hash(TOOLCHAIN, LINEAR, "float32", CompilationPipeline.STANDARD)
    artifact = CompiledKernelArtifact(
        id=kernel_artifact_id("ab" * 32, "h100", CompilationPipeline.STANDARD, digest),
        blueprint_id="ab" * 32, compilation_pipeline=CompilationPipeline.STANDARD,
        interface=LINEAR, target="h100", toolchain_hash=digest, kernel_binary_ref="cd" * 32)
    assert not kernel_is_stale(artifact, TOOLCHAIN)
    assert kernel_is_stale(artifact, dataclasses.replace(TOOLCHAIN, torch="2.12.0"))


def _job(**changes) -> CompileJob:
    ir = canonical_json(standard_library()[0])
    fields = {"blueprint_id": hashlib.sha256(ir).hexdigest(), "ir_json": ir,
              "interface": KernelInterface.parse("conv2d:6:10:2"), "device": "cpu",
              "dtype": "bfloat16", "pipeline": CompilationPipeline.STANDARD, "seed": 11}
    return CompileJob(**(fields | changes))


def test_compile_job_round_trips_through_json():
    job = _job()
    assert CompileJob.from_json(job.to_json()) == job
    assert json.loads(job.to_json())["ir_json"] == job.ir_json.decode()


@pytest.mark.parametrize("changes", [{"blueprint_id": "xyz"}, {"dtype": "float64"},
                                     {"seed": -1}, {"seed": True}, {"device": ""}])
def test_bad_compile_jobs_are_refused(changes):
    with pytest.raises(BadInputError):
        _job(**changes)


@pytest.mark.parametrize("text", ["{", "[]", '{"blueprint_id": "ab"}'])
def test_malformed_compile_job_json_is_bad_input(text):
    with pytest.raises(BadInputError):
        CompileJob.from_json(text)


def test_compile_result_round_trips_and_checks_file_names():
    record = CompilationRecord(pipeline=CompilationPipeline.FAST, compilation_seconds=0.01,
                               peak_memory_gb=0.5, toolchain_version=str(TOOLCHAIN))
    result = CompileResult(files={"weights.safetensors": "ef" * 32}, record=record,
                           toolchain=TOOLCHAIN, kernel_artifact_id="ab" * 6 + "-h100-fast-123456",
                           target="h100")
    assert CompileResult.from_json(result.to_json()) == result
    bad = json.loads(result.to_json())
    bad["files"] = {"../x": "ef" * 32}
    with pytest.raises(BadInputError):
        CompileResult.from_json(json.dumps(bad))


def _variant(requires_grad: bool) -> CompiledVariant:
    return CompiledVariant(form="rows", example_shape=[1024, 37], input_requires_grad=requires_grad,
                           dynamic=True, mode=None, offset=0, length=1)


def test_bundle_round_trip():
    payloads = [b"first payload", b"\x00" * 7]
    data = write_bundle("2.13.0", [(_variant(True), payloads[0]), (_variant(False), payloads[1])])
    variants = read_bundle(data)
    assert [p for _, p in variants] == payloads
    assert [m.input_requires_grad for m, _ in variants] == [True, False]


@pytest.mark.parametrize("damage", ["magic", "trailing", "truncated", "header"])
def test_malformed_bundles_are_integrity_errors(damage):
    data = write_bundle("2.13.0", [(_variant(True), b"payload")])
    broken = {
        "magic": b"X" + data[1:],
        "trailing": data + b"!",
        "truncated": data[:-1],
        "header": data.replace(b'"rows"', b'"cols"'),
    }[damage]
    with pytest.raises(IntegrityError):
        read_bundle(broken)

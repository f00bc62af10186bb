"""The standard pipeline on CPU (Inductor's C++ backend): an ahead-of-time compiled forward and
backward, written by one process, loads in a fresh process with no tracing or compiling and
computes what the eager module computes, value and gradients.

One compile (in a child process, as the forge runs it) serves the whole module: about 15 s on two
cores with a warm Inductor cache, about 30 s cold.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from esper.blueprints import canonical_json, standard_library
from esper.contracts import CompilationPipeline, KernelInterface
from esper.errors import IntegrityError
from esper.urza import Urza
from esper.workspace import Workspace
from pipelines.tezzeret.artifact import seal
from pipelines.tezzeret.compile import CompileJob, CompileResult
from pipelines.tezzeret.loader import load_kernel
from pipelines.tezzeret.toolchain import config_hash, kernel_artifact_id

# Inductor's CPU backend writes C++ and builds it with the host compiler.
pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="Inductor's CPU backend needs a C++ compiler")

ROOT = Path(__file__).resolve().parents[2]
BLUEPRINT = "mlp_gelu_w8"
INTERFACE = "linear:37:11"

COMPILE_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipelines.tezzeret.compile import CompileJob, compile_job
    compile_job(CompileJob.from_json(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
""")

# Loads the kernel in a fresh interpreter with recompilation forbidden, moves every parameter
# off its initial value (so that every gradient is nonzero), and compares the compiled path with
# the eager module for an input that requires grad and one that does not.
LOAD_CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from esper.urza import Urza
    from esper.workspace import Workspace
    from pipelines.tezzeret.loader import load_kernel

    torch.compiler.set_stance("fail_on_recompile")
    started = time.perf_counter()
    with Urza.open(Workspace(sys.argv[1])) as urza:
        kernel = load_kernel(urza, sys.argv[2], require_validated=False)
    load_s = time.perf_counter() - started
    assert kernel.compiled is not None, kernel.fallback_reason
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in kernel.module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))

    def run(fn, x, weight):
        x = x.detach().clone().requires_grad_(x.requires_grad)
        kernel.module.zero_grad(set_to_none=True)
        y = fn(x)
        (y * weight).sum().backward()
        grads = [p.grad.clone() for p in kernel.module.parameters()]
        return y.detach(), grads, (x.grad if x.requires_grad else None)

    report = {"load_s": load_s, "max_abs_diff": {}}
    for requires_grad in (True, False):
        # Leading dims (5, 3) flatten into the compiled (rows, 37) form and back.
        x = torch.randn(5, 3, 37, generator=generator).requires_grad_(requires_grad)
        weight = torch.randn(5, 3, 11, generator=generator)
        compiled = run(kernel, x, weight)
        eager = run(kernel.module, x, weight)
        diffs = [(compiled[0] - eager[0]).abs().max().item()]
        diffs += [(a - b).abs().max().item() for a, b in zip(compiled[1], eager[1])]
        if requires_grad:
            diffs.append((compiled[2] - eager[2]).abs().max().item())
        assert all(g.abs().sum() > 0 for g in compiled[1])
        report["max_abs_diff"][str(requires_grad)] = max(diffs)
    calls_before = kernel.compiled.compiled_calls
    with torch.no_grad():
        kernel(x)
    report["compiled_calls"] = calls_before
    report["eager_calls"] = kernel.compiled.eager_calls
    report["dynamo_frames"] = sum(torch._dynamo.utils.counters["frames"].values())
    print(json.dumps(report))
""")


def _python(code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, *args], check=False,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@dataclasses.dataclass
class Forged:
    workspace: Workspace
    job: CompileJob
    result: CompileResult
    out: Path
    kernel_id: str


@pytest.fixture(scope="module")
def forged(tmp_path_factory) -> Forged:
    root = tmp_path_factory.mktemp("standard")
    workspace = Workspace(root / "ws")
    workspace.create()
    ir = next(ir for ir in standard_library() if ir.name == BLUEPRINT)
    with Urza.open(workspace) as urza:
        blueprint, _ = urza.add_blueprint(canonical_json(ir), name=ir.name,
                                          interface_kind=ir.interface_kind, origin="library",
                                          actor="test")
        job = CompileJob(blueprint_id=blueprint.id, ir_json=urza.blueprint_ir(blueprint.id),
                         interface=KernelInterface.parse(INTERFACE), device="cpu",
                         dtype="float32", pipeline=CompilationPipeline.STANDARD, seed=3)
        (root / "job.json").write_text(job.to_json())
        out = root / "out"
        child = _python(COMPILE_CHILD, str(root / "job.json"), str(out))
        assert child.returncode == 0, child.stderr[-3000:]
        result = CompileResult.from_json((out / "result.json").read_text())
        artifact = seal(job, result, out, urza, workspace.private_key("forge"))
        urza.add_kernel(artifact, actor="forge")
        assert urza.verify().ok
    return Forged(workspace, job, result, out, artifact.id)


def test_standard_artifact_holds_weights_and_compiled_code(forged):
    assert set(forged.result.files) == {"weights.safetensors", "compiled.bin"}
    flags = forged.result.record.optimization_flags
    assert "fullgraph" in flags and "bucket=rows:1024" in flags
    assert forged.kernel_id.split("-")[1:3] == ["cpu", "standard"]


def test_a_fresh_process_loads_it_without_compiling_and_matches_eager(forged):
    child = _python(LOAD_CHILD, str(forged.workspace.root), forged.kernel_id)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["dynamo_frames"] == 0  # nothing was traced: fail_on_recompile never fired
    assert report["compiled_calls"] == 2  # both variants (input requires grad or not) ran
    assert report["eager_calls"] == 1  # under no_grad the eager module runs
    # float32, 15 rows of 37: the compiled kernels reassociate sums; eager is the reference.
    for requires_grad, diff in report["max_abs_diff"].items():
        assert diff <= 1e-5, (requires_grad, diff)


def test_a_tampered_compiled_function_is_never_deserialized(forged):
    with Urza.open(forged.workspace) as urza:
        digest = forged.result.files["compiled.bin"]
        path = urza.store.path_for(digest)
        original = path.read_bytes()
        os.chmod(path, 0o644)
        try:
            path.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
            with pytest.raises(IntegrityError, match="compiled.bin"):
                load_kernel(urza, forged.kernel_id, require_validated=False)
        finally:
            path.write_bytes(original)
            os.chmod(path, 0o444)


def test_another_toolchain_falls_back_to_the_eager_module(forged):
    # Seal the same files under a manifest that records another torch: the loader must not run
    # code compiled for it, and says why.
    other = dataclasses.replace(forged.result.toolchain, torch="2.11.0+cu130")
    digest = config_hash(other, forged.job.interface, forged.job.dtype, forged.job.pipeline)
    result = dataclasses.replace(
        forged.result, toolchain=other,
        kernel_artifact_id=kernel_artifact_id(forged.job.blueprint_id, forged.result.target,
                                              forged.job.pipeline, digest))
    with Urza.open(forged.workspace) as urza:
        artifact = seal(forged.job, result, forged.out, urza,
                        forged.workspace.private_key("forge"))
        urza.add_kernel(artifact, actor="forge")
        kernel = load_kernel(urza, artifact.id, require_validated=False)
    assert kernel.compiled is None
    assert "torch 2.11.0+cu130 != " in kernel.fallback_reason
    x = torch.randn(4, 37, requires_grad=True)
    y = kernel(x)
    assert torch.equal(y, kernel.module(x)) and not y.any()
    y.sum().backward()
    assert kernel.module.layers[-1].weight.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize(("name", "interface", "shape"), [
    ("bottleneck_bn_relu_w8", "conv2d:6:10:2", (8, 6, 32, 32)),
    ("conv3x3_relu_w16", "conv2d:6:10:1", (8, 6, 32, 32)),
    ("attention_head_d16", "linear:37:11", (3, 7, 37)),
    ("mlp_gelu_w32_dropout", "linear:37:11", (2, 9, 37)),
])
def test_standard_pipeline_across_blueprint_kinds(tmp_path, name, interface, shape):
    """Batch norm (running statistics are buffers the compiled graph mutates), attention,
    conv maps, and dropout (random: compared in eval mode, where the eager module runs)."""
    import copy

    workspace = Workspace(tmp_path / "ws")
    workspace.create()
    ir = next(ir for ir in standard_library() if ir.name == name)
    with Urza.open(workspace) as urza:
        blueprint, _ = urza.add_blueprint(canonical_json(ir), name=ir.name,
                                          interface_kind=ir.interface_kind, actor="test")
        job = CompileJob(blueprint_id=blueprint.id, ir_json=urza.blueprint_ir(blueprint.id),
                         interface=KernelInterface.parse(interface), device="cpu",
                         dtype="float32", pipeline=CompilationPipeline.STANDARD)
        (tmp_path / "job.json").write_text(job.to_json())
        child = _python(COMPILE_CHILD, str(tmp_path / "job.json"), str(tmp_path / "out"))
        assert child.returncode == 0, child.stderr[-3000:]
        result = CompileResult.from_json((tmp_path / "out" / "result.json").read_text())
        artifact = seal(job, result, tmp_path / "out", urza, workspace.private_key("forge"))
        urza.add_kernel(artifact, actor="forge")
        kernel = load_kernel(urza, artifact.id, require_validated=False)
    assert kernel.compiled is not None, kernel.fallback_reason
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in kernel.module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    reference = copy.deepcopy(kernel.module)
    x = torch.randn(shape, generator=generator, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = kernel(x), reference(x_ref)
    assert kernel.compiled.compiled_calls == 1
    weight = torch.randn(y.shape, generator=generator)
    (y * weight).sum().backward()
    (y_ref * weight).sum().backward()
    if "dropout" in name:
        assert all(p.grad is not None for p in kernel.module.parameters())
        kernel.module.eval()
        with torch.no_grad():
            torch.testing.assert_close(kernel(x), reference.eval()(x))
        assert kernel.compiled.eager_calls == 1  # the variants were compiled in train mode
        return
    # fp32 sums over up to 8192 terms in another order: compared in relative norm, not per element.
    assert_close_in_norm(y, y_ref, "output")
    assert_close_in_norm(x.grad, x_ref.grad, "input grad")
    for (key, p), p_ref in zip(kernel.module.named_parameters(), reference.parameters()):
        assert_close_in_norm(p.grad, p_ref.grad, f"{key} grad")
    for (key, b), b_ref in zip(kernel.module.named_buffers(), reference.buffers()):
        assert_close_in_norm(b.double(), b_ref.double(), key)  # batch-norm running statistics


def assert_close_in_norm(actual: torch.Tensor, expected: torch.Tensor, what: str,
                         rtol: float = 1e-5) -> None:
    error = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert error <= rtol, f"{what}: relative error {error:.2e} in norm (allowed {rtol:.0e})"

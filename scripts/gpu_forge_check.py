"""The forge's `standard` pipeline on a GPU: compile, then load in a fresh process and run.

    python scripts/gpu_forge_check.py --device cuda --out forge-check.json
    python scripts/gpu_forge_check.py --device cpu --blueprint mlp_gelu_w8=linear:37:11

For each blueprint: a child process compiles it exactly as the forge's child does
(`compile_job`: weights, then AOT-compiled forward+backward per shape bucket); then a FRESH child
process, with `torch.compiler.set_stance("fail_on_recompile")`, verifies the files' hashes
against the compile result, rebuilds the module, deserializes the compiled functions and
measures: load time (deserialization alone, and everything from reading the files to ready;
by default with empty Inductor and Triton caches, as on a machine that never compiled it),
the first forward+backward, steady-state forward+backward compiled and eager, the largest
relative error (in norm) of the output and every gradient against the eager module, dynamo
frames traced in the loading process (must be 0), and which probe shapes the compiled variants
cover (the others run eager). Prints a markdown table; writes the raw numbers as JSON to --out;
exits 1 if a load traced anything, missed its own bucket, or was less accurate than eager.
About 50 s per blueprint on an H100 (mostly imports and compilation): the default five take
4 to 5 minutes; `--pipeline aggressive` about 90 s per blueprint. Results for an H100 are in
docs/forge-compile-api.md.

Needs torch, safetensors and pydantic (esper.contracts, esper.blueprints); not the catalog,
the signing library or Redis.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A seed's blueprint reads the host layer's input (IN) and writes one chunk of its output (OUT).
DEFAULT_BLUEPRINTS = {
    "cuda": ["mlp_gelu_w32=linear:1024:64", "swiglu_w32=linear:1024:64",
             "attention_head_d16=linear:256:64", "conv3x3_relu_w16=conv2d:64:32:1",
             "bottleneck_bn_relu_w8=conv2d:64:32:2"],
    "cpu": ["mlp_gelu_w8=linear:37:11", "attention_head_d16=linear:37:11",
            "conv3x3_relu_w16=conv2d:6:10:2"],
}
# Relative error in norm between compiled and eager that passes outright (fp32 sums reassociate,
# bf16 rounds); past it, the compiled path must be within 2x of eager's error against float64.
RTOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--pipeline", default="standard", choices=["standard", "aggressive"])
    parser.add_argument("--dtype", default="float32", choices=sorted(RTOL))
    parser.add_argument("--blueprint", action="append", metavar="NAME=INTERFACE",
                        help="a standard blueprint and interface (repeatable); default: a set "
                             "of linear, attention and conv blueprints")
    parser.add_argument("--steps", type=int, default=50, help="timed steady-state iterations")
    parser.add_argument("--warm-cache-load", action="store_true",
                        help="load with this machine's Inductor and Triton caches (default: "
                             "empty caches, as a process on another machine would)")
    parser.add_argument("--workdir", type=Path, help="keep the artifacts here (default: temp)")
    parser.add_argument("--out", type=Path, help="write the raw results here as JSON")
    parser.add_argument("--child-compile", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-load", nargs=2, metavar=("DIR", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_compile:
        return _child_compile(Path(args.child_compile[0]), Path(args.child_compile[1]))
    if args.child_load:
        return _child_load(Path(args.child_load[0]), int(args.child_load[1]))

    device_kind = "cpu" if args.device == "cpu" else "cuda"
    specs = args.blueprint or DEFAULT_BLUEPRINTS[device_kind]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="esper-forge-check-"))
    rows = [_check(spec, args, workdir) for spec in specs]
    environment = _environment(args.device)
    print(_table(rows, environment))
    if args.out:
        args.out.write_text(json.dumps({"environment": environment, "results": rows}, indent=2))
        print(f"raw numbers: {args.out}")
    return 0 if all(r.get("ok") for r in rows) else 1


def _check(spec: str, args, workdir: Path) -> dict:
    from esper.blueprints import canonical_json, standard_library
    from esper.contracts import CompilationPipeline, KernelInterface
    from pipelines.tezzeret.compile import CompileJob

    name, interface = spec.split("=")
    ir = next((ir for ir in standard_library() if ir.name == name), None)
    if ir is None:
        raise SystemExit(f"no standard blueprint named {name!r}")
    ir_json = canonical_json(ir)
    job = CompileJob(blueprint_id=hashlib.sha256(ir_json).hexdigest(), ir_json=ir_json,
                     interface=KernelInterface.parse(interface), device=args.device,
                     dtype=args.dtype, pipeline=CompilationPipeline(args.pipeline))
    folder = workdir / f"{name}-{interface.replace(':', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.json").write_text(job.to_json())
    row = {"blueprint": name, "interface": interface, "dtype": args.dtype,
           "pipeline": args.pipeline, "load_caches": "warm" if args.warm_cache_load else "empty"}
    started = time.perf_counter()
    compiled = _run_self(["--child-compile", str(folder / "job.json"), str(folder / "out")])
    row["compile_wall_s"] = round(time.perf_counter() - started, 2)
    if compiled.returncode != 0:
        row.update(ok=False, error=_last_line(compiled.stderr))
        return row
    result = json.loads((folder / "out" / "result.json").read_text())
    row["compile_s"] = result["record"]["compilation_seconds"]
    row["kernel_artifact_id"] = result["kernel_artifact_id"]
    row["compiled_bytes"] = (folder / "out" / "compiled.bin").stat().st_size
    caches = {}
    if not args.warm_cache_load:  # nothing the compile left on this machine can help the load
        caches = {"TORCHINDUCTOR_CACHE_DIR": str(folder / "load-cache" / "inductor"),
                  "TRITON_CACHE_DIR": str(folder / "load-cache" / "triton")}
    loaded = _run_self(["--child-load", str(folder), str(args.steps)], caches)
    if loaded.returncode != 0:
        row.update(ok=False, error=_last_line(loaded.stderr))
        return row
    row.update(json.loads(loaded.stdout.strip().splitlines()[-1]))
    row["ok"] = row["dynamo_frames"] == 0 and row["accurate"] and row["first_call_compiled"]
    return row


def _run_self(argv: list[str],
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, **(extra_env or {}))
    return subprocess.run([sys.executable, __file__, *argv], check=False, capture_output=True,
                          text=True, env=env, timeout=1800)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(no output)"


# Children ---------------------------------------------------------------------------------

def _child_compile(job_path: Path, out: Path) -> int:
    from pipelines.tezzeret.compile import CompileJob, compile_job

    compile_job(CompileJob.from_json(job_path.read_text()), out)
    return 0


def _child_load(folder: Path, steps: int) -> int:
    started = time.perf_counter()
    import torch

    torch.compiler.set_stance("fail_on_recompile")  # any tracing in this process would raise
    import torch._dynamo  # imported here so that deserialize_s times the loading alone
    import torch._inductor.compile_fx
    from safetensors.torch import load

    from esper.blueprints import build, load_ir
    from pipelines.tezzeret.compile import CompileJob, CompileResult, input_form
    from pipelines.tezzeret.loader import attach_compiled

    imported = time.perf_counter()
    job = CompileJob.from_json((folder / "job.json").read_text())
    result = CompileResult.from_json((folder / "out" / "result.json").read_text())
    # Read once, check against the compile result, then deserialize those bytes.
    files = {name: (folder / "out" / name).read_bytes() for name in result.files}
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != result.files[name]:
            raise SystemExit(f"{name}: does not match its compile result")
    if hashlib.sha256(job.ir_json).hexdigest() != job.blueprint_id:
        raise SystemExit("the IR does not match its blueprint id")
    device, dtype = torch.device(job.device), getattr(torch, job.dtype)
    ir = load_ir(job.ir_json)
    module = build(ir, job.interface, dtype=dtype, seed=0)
    module.load_state_dict(load(files["weights.safetensors"]), strict=True)
    module = module.to(device)
    form = input_form(ir, job.interface)
    before = time.perf_counter()
    compiled = attach_compiled(module, form, files["compiled.bin"])
    _sync(device)
    deserialize_s = time.perf_counter() - before
    ready_s = time.perf_counter() - imported

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move off the zero init so that every gradient is nonzero
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator).to(device, dtype))
    shape = compiled.variants[0].example_shape

    def randn(shape) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)

    x = randn(shape).requires_grad_(True)
    with torch.no_grad():
        weight = torch.ones_like(module(x))

    def step(fn) -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        (fn(x) * weight).sum().backward()

    # First forward+backward after load: includes whatever the first launch costs.
    before = time.perf_counter()
    step(compiled)
    _sync(device)
    first_s = time.perf_counter() - before
    first_call_compiled = compiled.compiled_calls == 1

    report = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(),
        "example_shape": shape, "import_s": round(imported - started, 3),
        "deserialize_s": round(deserialize_s, 4), "load_ready_s": round(ready_s, 4),
        "first_fwd_bwd_ms": round(first_s * 1e3, 3), "first_call_compiled": first_call_compiled,
        "steady_compiled_ms": round(_time(step, compiled, device, steps), 4),
        "steady_eager_ms": round(_time(step, module, device, steps), 4),
    }
    errors = [_compare(module, compiled, randn(shape), rg) for rg in (True, False)]
    report.update({f"max_rel_err_{key}": max(e[key] for e in errors) for key in errors[0]})
    # As accurate as eager: close to it, or no further from float64 than twice eager's error.
    report["accurate"] = all(e["vs_eager"] <= RTOL[job.dtype]
                             or e["compiled_vs_fp64"] <= 2 * e["eager_vs_fp64"] for e in errors)
    report["coverage"] = _coverage(compiled, module, form, job.interface, randn)
    report["dynamo_frames"] = sum(torch._dynamo.utils.counters["frames"].values())
    print(json.dumps(report))
    return 0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step, fn, device, steps: int) -> float:
    """Median milliseconds per forward+backward over `steps` iterations, after a warm-up."""
    for _ in range(5):
        step(fn)
    _sync(device)
    samples = []
    for _ in range(steps):
        before = time.perf_counter()
        step(fn)
        _sync(device)  # sync: one host wait per iteration, the same for both paths
        samples.append((time.perf_counter() - before) * 1e3)
    return statistics.median(samples)


def _compare(module, compiled, x, requires_grad: bool) -> dict[str, float]:
    """Largest relative error in norm, over the output and every gradient, of the compiled path
    against the eager module, and of both against a float64 copy of the module."""
    import copy

    import torch

    reference = copy.deepcopy(module).double()

    def run(fn, net, dtype):
        net.zero_grad(set_to_none=True)
        xi = x.detach().to(dtype).requires_grad_(requires_grad)
        y = fn(xi)
        (y * torch.sign(y.detach())).sum().backward()
        grads = [p.grad.double() for p in net.parameters()]
        return [y.detach().double(), *grads] + ([xi.grad.double()] if requires_grad else [])

    def error(got, want) -> float:
        return max(((a - b).norm() / b.norm().clamp_min(1e-300)).item()
                   for a, b in zip(got, want))

    calls = compiled.compiled_calls
    got = run(compiled, module, x.dtype)
    eager = run(module, module, x.dtype)
    exact = run(reference, reference, torch.float64)
    assert compiled.compiled_calls == calls + 1, "the compiled path did not run"
    return {"vs_eager": error(got, eager), "compiled_vs_fp64": error(got, exact),
            "eager_vs_fp64": error(eager, exact)}


def _coverage(compiled, module, form: str, interface, randn) -> dict[str, bool]:
    """Which input shapes the compiled variants take (True) or leave to the eager module."""
    probes = {
        "rows": [(1,), (2,), (7,), (333,), (1024,), (4096,), (5000,), (65536,)],
        "sequence": [(1, 128), (3, 7), (8, 128), (8, 1000), (32, 512)],
        "maps": [(1, 32, 32), (3, 32, 32), (8, 32, 32), (16, 32, 32), (8, 16, 16), (8, 56, 56),
                 (8, 32, 48), (4, 7, 9)],
    }[form]
    from pipelines.tezzeret.compile import example_shape

    covered = {}
    for leading in probes:
        shape = example_shape(form, leading, interface)
        before = compiled.compiled_calls
        compiled(randn(shape).requires_grad_(True))
        covered["x".join(map(str, shape))] = compiled.compiled_calls > before
    return covered


# Report -----------------------------------------------------------------------------------

def _environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "device": device, "cpu": platform.processor() or platform.machine()}
    if device != "cpu":
        import triton

        env.update(triton=triton.__version__, cuda=torch.version.cuda,
                   gpu=torch.cuda.get_device_name(torch.device(device)))
    return env


def _table(rows: list[dict], environment: dict) -> str:
    header = ("| blueprint | interface | input | compile s | deserialize s | load to ready s | "
              "first fwd+bwd ms | steady compiled ms | steady eager ms | rel err vs eager | "
              "rel err vs fp64 (eager) | dynamo frames at load | shapes covered |")
    lines = [", ".join(f"{k} {v}" for k, v in environment.items()), "", header,
             "|" + " --- |" * (header.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['blueprint']} | {r['interface']} | FAILED: {r['error']} |")
            continue
        covered = sum(r["coverage"].values())
        lines.append(
            f"| {r['blueprint']} | {r['interface']} | {'x'.join(map(str, r['example_shape']))} | "
            f"{r['compile_s']:.1f} | {r['deserialize_s']:.3f} | {r['load_ready_s']:.3f} | "
            f"{r['first_fwd_bwd_ms']:.1f} | {r['steady_compiled_ms']:.3f} | "
            f"{r['steady_eager_ms']:.3f} | {r['max_rel_err_vs_eager']:.1e} | "
            f"{r['max_rel_err_compiled_vs_fp64']:.1e} ({r['max_rel_err_eager_vs_fp64']:.1e}) | "
            f"{r['dynamo_frames']} | "
            f"{covered}/{len(r['coverage'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""The forge daemon end to end on a GPU: `esper forge --once --device cuda` through its Python
entry, then every kernel it built loaded through the verifying loader and run forward+backward.

    python scripts/gpu_forge_daemon_check.py --out docs/forge-daemon-gpu.json

Needs a CUDA device; the workspace is a temporary directory. Prints one line per kernel and
writes the raw numbers to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from esper.contracts import CompilationPipeline, KernelInterface
from esper.library import init_workspace
from esper.urza import Urza
from esper.workspace import Workspace
from pipelines.tezzeret.forge import ForgeOptions, run_forge
from pipelines.tezzeret.loader import load_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-jobs", type=int, default=6)
    parser.add_argument("--interface", default="linear:256:64")
    args = parser.parse_args()

    ws = Workspace(Path(tempfile.mkdtemp()) / "ws")
    init_workspace(ws)
    interface = KernelInterface.parse(args.interface)
    options = ForgeOptions(devices=("cuda",), interfaces=(interface,), max_jobs=args.max_jobs,
                           pipelines=(CompilationPipeline.FAST, CompilationPipeline.STANDARD))
    started = time.perf_counter()
    summary = run_forge(ws, None, options, once=True, progress=print)
    forge_seconds = time.perf_counter() - started

    rows = []
    with Urza.open(ws) as urza:
        for kernel in urza.list_kernels():
            t0 = time.perf_counter()
            loaded = load_kernel(urza, kernel.id, device="cuda", require_validated=False)
            load_s = time.perf_counter() - t0
            # (batch, sequence, features): every linear blueprint takes it, attention needs it
            x = torch.randn(4, 16, interface.in_features, device="cuda", requires_grad=True)
            y = loaded(x)
            y.square().sum().backward()
            torch.cuda.synchronize()
            rows.append({"kernel": kernel.id, "pipeline": kernel.compilation_pipeline.value,
                         "compiled_attached": loaded.compiled is not None,
                         "fallback_reason": loaded.fallback_reason, "load_s": load_s,
                         "output_is_zero": bool((y == 0).all()),
                         "input_grad_finite": bool(torch.isfinite(x.grad).all())})
            print(f"{kernel.id:40} {rows[-1]['pipeline']:9} compiled={rows[-1]['compiled_attached']}"
                  f" load {load_s * 1e3:7.1f} ms  zero-at-init={rows[-1]['output_is_zero']}")
        verify = urza.verify()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "forge_seconds": forge_seconds, "summary": summary.to_jsonable(),
              "kernels": rows, "verify_ok": verify.ok, "verify_problems": verify.problems}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"forge: {len(summary.built)} built, {len(summary.failures)} failed in "
          f"{forge_seconds:.1f} s; verify ok={verify.ok}")


if __name__ == "__main__":
    main()

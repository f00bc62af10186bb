"""The gauntlet child: the process `sandbox.py` starts for each kernel.

    python -m pipelines.urabrask.worker WORKSPACE JOB.json OUT_DIR [--cpu-limit-s S]
                                        [--parent-pid PID]

Reads the GauntletJob JSON, opens the workspace's catalog (only to read the kernel's row and
blobs), runs stages 1 and 2 (`run_gauntlet`: the loader verifies the forge signature and every
hash first), writes OUT_DIR/result.json atomically and exits 0, whether the kernel passed or
failed a check, or could not be loaded because the workspace's store is damaged (the result's
`store_damage`: the parent leaves that kernel unjudged). A crash, a hang or a runaway
allocation is the parent's to see: it kills the process group and rejects the kernel. The
child never holds the bench key: the parent signs.

On a GPU it exits holding the GPU lock as active (gpu_lock.py), so that no measurement runs
while its CUDA context is torn down.

Just before it loads the kernel it writes OUT_DIR/ready.json, `{"peak_rss_mb": M}` (its peak
resident set so far: Python, torch, the catalog, CUDA's context): the warm forge worker's
`{"ready": true}`, as a file, since this child's stdout is its log. A child that ends without
it, or whose start alone went past the memory limit, failed before the kernel could have had a
part in it: the parent releases the kernel instead of rejecting it.

Before anything heavy is imported it caps its CPU time, disables core files and asks to die with
the daemon (the forge worker's helpers, reused).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

RESULT_FILE = "result.json"
READY_FILE = "ready.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.urabrask.worker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("job", type=Path, help="the GauntletJob JSON file")
    parser.add_argument("out_dir", type=Path, help="where result.json goes")
    parser.add_argument("--cpu-limit-s", type=float, default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)

    from pipelines.tezzeret.worker import _cap_cpu, _describe, _die_with_parent, _peak_rss_mb

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    if args.cpu_limit_s is not None:
        _cap_cpu(args.cpu_limit_s, hard=True)
    try:
        from esper._fs import atomic_write_text
        from esper.urza import Urza
        from esper.workspace import Workspace
        from pipelines.urabrask.gauntlet import GauntletJob, run_gauntlet
        from pipelines.urabrask.gpu_lock import GpuLock

        def reached_kernel() -> None:
            atomic_write_text(args.out_dir / READY_FILE,
                              json.dumps({"peak_rss_mb": _peak_rss_mb()}))

        job = GauntletJob.from_jsonable(json.loads(args.job.read_text(encoding="utf-8")))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        with Urza.open(Workspace(args.workspace).require()) as urza:
            result = run_gauntlet(urza, job, reached_kernel=reached_kernel)
        atomic_write_text(args.out_dir / RESULT_FILE, json.dumps(result.to_jsonable()))
        lock = GpuLock.for_device(job.device)
        if lock is not None:
            # This process's CUDA context is torn down as it exits: not inside another's
            # measurement (gpu_lock.py). Held until the kernel closes it at exit.
            lock.hold_active_until_exit()
    except Exception as e:  # noqa: BLE001 - the parent wants one line, whatever failed
        print(_describe(e), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

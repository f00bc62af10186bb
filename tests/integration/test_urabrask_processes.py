"""`esper bench` as a separate process, the way it runs next to the forge: a daemon woken by the
forge's `compilation.kernel.ready` on the bus and stopped by SIGTERM, and a SIGTERM in the middle
of a gauntlet that gives the kernel back to the queue unjudged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from catalog_helpers import library_ir, plant, wide_conv_ir
from process_helpers import ESPER, sandbox_children, wait_for

from esper.contracts import KernelReady, KernelStatus, Topic
from esper.oona import Oona, stop_embedded
from esper.urza import Urza
from esper.workspace import Workspace


def bench_process(ws: Workspace, worker: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([ESPER, "--workspace", str(ws.root), "--json", "bench",
                             "--worker-id", worker, "--round-seconds", "0.03", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def status(ws: Workspace, kernel_id: str) -> KernelStatus:
    with Urza.open(ws) as urza:
        return urza.get_kernel(kernel_id).status


def test_a_bench_daemon_is_woken_by_the_bus_and_exits_0_on_sigterm(workspace, tmp_path):
    with Urza.open(workspace) as urza:
        first = plant(urza, tmp_path, library_ir("low_rank_r2"), "linear:16:4")
    # The poll interval is long: judging the second kernel quickly means the bus woke it.
    daemon = bench_process(workspace, "bench-d", "--poll-interval-s", "120")
    try:
        wait_for(lambda: status(workspace, first) is KernelStatus.VALIDATED, 90, "the first kernel")
        time.sleep(1.0)  # the daemon is now waiting on the bus
        with Urza.open(workspace) as urza:
            second = plant(urza, tmp_path, library_ir("mlp_relu_w4"), "linear:16:4")
            blueprint_id = urza.get_kernel(second).blueprint_id
        bus = Oona.connect(workspace, sender_id="forge-test")
        try:
            bus.publish(Topic.COMPILATION_KERNEL_READY, KernelReady(
                kernel_artifact_id=second, blueprint_id=blueprint_id, pipeline="fast",
                target="cpu"))
        finally:
            bus.close()
        wait_for(lambda: status(workspace, second) is KernelStatus.VALIDATED, 40,
                 "the second kernel, woken by the bus")

        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, err
        assert time.monotonic() - started < 5
        summary = json.loads(out)
        assert summary["stopped_by_signal"] and summary["validated"] == 2
        assert [j["kernel_id"] for j in summary["jobs"]] == [first, second]
    finally:
        daemon.kill()
        stop_embedded(workspace)


def test_sigterm_mid_gauntlet_releases_the_claim_and_exits_0(workspace, tmp_path):
    with Urza.open(workspace) as urza:
        # Minutes of profiling on 2 cores: it is still running when the signal comes.
        slow = plant(urza, tmp_path, wide_conv_ir(), "conv2d:256:256:1")
    daemon = bench_process(workspace, "bench-t", "--grace-s", "0", "--once")
    try:
        [child] = wait_for(lambda: sandbox_children(daemon.pid, "pipelines.urabrask.worker"), 30,
                           "the gauntlet child")
        time.sleep(1.0)
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, err
        summary = json.loads(out)
        assert summary["stopped_by_signal"] and summary["released"] == 1
        assert summary["jobs"] == []
        assert not os.path.exists(f"/proc/{child}")
    finally:
        daemon.kill()
        stop_embedded(workspace)
    with Urza.open(workspace) as urza:
        kernel = urza.get_kernel(slow)
        assert kernel.status is KernelStatus.PENDING_BENCHMARKING and kernel.validation_report is None
        # Unclaimed: another bench takes it at once.
        assert urza.claim_next_kernel("bench-2", 60).id == slow


pytestmark = pytest.mark.timeout(240)

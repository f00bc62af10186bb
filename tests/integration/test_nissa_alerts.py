"""Each alert rule of `esper watch` fires on a planted condition: real Redis, real Urza, the real
CLI in --once mode (exit 4 and the alert as a system.alerts envelope on stdout)."""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.contracts import DaemonHeartbeat, Envelope, EpochEvent, SeedTransition, Topic
from esper.contracts import SeedLifecycle as S
from esper.nissa import ALERT_EXIT_CODE
from esper.oona import Oona, stop_embedded
from esper.workspace import Workspace
from esper_cli.main import app

ROLLBACK_PATH = [S.DORMANT, S.GERMINATED, S.LOADING, S.TRAINING, S.GRAFTING, S.ROLLED_BACK]


@pytest.fixture
def ws():
    root = Path(tempfile.mkdtemp(prefix="nw", dir="/tmp"))  # the Redis socket path is short
    workspace = Workspace(root / "ws")
    workspace.create()
    yield workspace
    stop_embedded(workspace)
    shutil.rmtree(root, ignore_errors=True)


def watch_once(ws: Workspace, rules: dict, *args: str) -> tuple[int, list[Envelope]]:
    path = ws.root / "rules.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in rules.items()))
    result = CliRunner().invoke(app, ["--workspace", str(ws.root), "watch", "--once", "--json",
                                      "--alerts", str(path), *args])
    envelopes = [Envelope.from_json(line) for line in result.stdout.splitlines() if line]
    return result.exit_code, envelopes


def fired(envelopes: list[Envelope]) -> dict[tuple[str, str], Envelope]:
    return {(e.payload.rule, e.payload.subject): e for e in envelopes
            if e.topic is Topic.SYSTEM_ALERTS}


def epoch(run_id: str, n: int) -> EpochEvent:
    return EpochEvent(run_id=run_id, epoch=n, global_step=n * 7, train_loss=0.5,
                      validation_loss=0.6)


def test_quiet_bus_exits_0_and_alerts_are_published(ws):
    with Oona.connect(ws, sender_id="tolaria") as bus:
        bus.publish(Topic.SYSTEM_EVENTS_EPOCH, epoch("calm", 1))
        code, envelopes = watch_once(ws, {})
        assert code == 0 and fired(envelopes) == {}
        # A stalled run: one epoch event, then silence past the threshold.
        time.sleep(0.3)
        code, envelopes = watch_once(ws, {"epoch_stale_s": 0.2})
        assert code == ALERT_EXIT_CODE
        alert = fired(envelopes)[("run_stalled", "calm")]
        assert alert.payload.value > 0.2 and alert.payload.threshold == 0.2
        # The alert is also on the bus, for whoever pages.
        published = bus.range(Topic.SYSTEM_ALERTS)
        assert [e.envelope.payload.rule for e in published] == ["run_stalled"]


def test_a_finished_run_is_not_stalled(ws):
    from esper.urza import Urza

    with Urza.open(ws) as urza:
        urza.register_run("done", json.dumps({"epochs": 2}))
    with Oona.connect(ws, sender_id="tolaria") as bus:
        bus.publish_many([(Topic.SYSTEM_EVENTS_EPOCH, epoch("done", 1)),
                          (Topic.SYSTEM_EVENTS_EPOCH, epoch("done", 2))])
    time.sleep(0.3)
    code, envelopes = watch_once(ws, {"epoch_stale_s": 0.2})
    assert code == 0, envelopes


def test_rollback_rate(ws):
    with Oona.connect(ws, sender_id="tolaria") as bus:
        messages = [(Topic.SYSTEM_EVENTS_EPOCH, epoch("shaky", 3))]
        for seed in range(3):  # three adaptations rolled back, one fossilized
            path = ROLLBACK_PATH if seed < 2 else ROLLBACK_PATH[:-1] + [S.STABILIZATION,
                                                                      S.EVALUATING,
                                                                      S.FINE_TUNING,
                                                                      S.FOSSILIZED]
            for a, b in itertools.pairwise(path):
                messages.append((Topic.LIFECYCLE_SEED_TRANSITIONS,
                                 SeedTransition(run_id="shaky", seed_id=f"1:{seed}", epoch=3,
                                                from_stage=a, to_stage=b)))
        bus.publish_many(messages)
    code, envelopes = watch_once(ws, {"rollback_rate_max": 0.5, "rollback_min_outcomes": 3})
    assert code == ALERT_EXIT_CODE
    alert = fired(envelopes)[("rollback_rate", "shaky")]
    assert alert.payload.value == pytest.approx(2 / 3)
    # Under the threshold: quiet.
    code, envelopes = watch_once(ws, {"rollback_rate_max": 0.7, "rollback_min_outcomes": 3})
    assert code == 0


def test_consumer_lag(ws):
    with Oona.connect(ws, sender_id="forge") as bus:
        bus.consumer("slowpoke", [Topic.COMPILATION_KERNEL_READY], "slow-1")
        from esper.contracts import KernelReady

        bus.publish_many([(Topic.COMPILATION_KERNEL_READY,
                           KernelReady(kernel_artifact_id=f"abababababab-cpu-fast-{i:06x}",
                                       blueprint_id="ab" * 32, pipeline="fast", target="cpu"))
                          for i in range(5)])
    code, envelopes = watch_once(ws, {"consumer_lag_max": 3})
    assert code == ALERT_EXIT_CODE
    alert = fired(envelopes)[("consumer_lag", "compilation.kernel.ready/slowpoke")]
    assert alert.payload.value == 5
    # The watcher read the stream but took nothing from the group.
    with Oona.connect(ws, sender_id="x") as bus:
        [group] = bus.group_info(Topic.COMPILATION_KERNEL_READY)
        assert group.pending == 0 and group.last_delivered_id == "0-0"


def test_daemon_stalled_unless_it_said_it_was_stopping(ws):
    with Oona.connect(ws, sender_id="forge") as bus:
        bus.publish_many([
            (Topic.SYSTEM_HEARTBEATS, DaemonHeartbeat(daemon="tezzeret", worker_id="f-1",
                                                      state="idle", interval_s=0.1)),
            (Topic.SYSTEM_HEARTBEATS, DaemonHeartbeat(daemon="urabrask", worker_id="b-1",
                                                      state="stopping", interval_s=0.1))])
    time.sleep(0.3)
    code, envelopes = watch_once(ws, {"daemon_stale_s": 0.2})
    assert code == ALERT_EXIT_CODE
    assert set(fired(envelopes)) == {("daemon_stalled", "tezzeret/f-1")}


def test_certification_rate(ws, tmp_path):
    from catalog_helpers import library_ir, plant

    from esper import signing
    from esper.contracts import LATENCY_MS, UrabraskValidationReport
    from esper.urza import Urza

    with Urza.open(ws) as urza:
        for i, name in enumerate(["mlp_gelu_w8", "mlp_relu_w4"]):
            kernel = urza.get_kernel(plant(urza, tmp_path, library_ir(name), "linear:8:4"))
            passed = i == 0
            report = UrabraskValidationReport(
                kernel_artifact_id=kernel.id, blueprint_id=kernel.blueprint_id,
                passed_validation=passed, benchmark_results={LATENCY_MS: 0.1} if passed else {},
                rejection_reason=None if passed else "not finite")
            urza.apply_validation_report(signing.sign(report.to_json().encode(),
                                                      ws.private_key("bench"), "bench"),
                                         actor="test")
    code, envelopes = watch_once(ws, {"certification_rate_min": 0.75,
                                      "certification_min_judged": 2})
    assert code == ALERT_EXIT_CODE
    assert fired(envelopes)[("certification_rate", "urabrask")].payload.value == 0.5
    code, _ = watch_once(ws, {"certification_rate_min": 0.5, "certification_min_judged": 2})
    assert code == 0


def test_bad_rules_file_exits_2_naming_the_field(ws):
    code, _ = watch_once(ws, {"consumer_lag_maxx": 3})
    assert code == 2

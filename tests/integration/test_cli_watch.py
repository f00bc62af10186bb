"""`esper watch` as an operator runs it: the real CLI in a subprocess, a real pseudo-terminal for
the dashboard, the embedded Redis and a real catalog. Events are the ones a tiny training and the
forge publish, sent with the real contracts while the watcher runs."""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import pty
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tolaria_helpers import forged_workspace, short_dir, tiny_config

from esper.blueprints import canonical_json, standard_library
from esper.contracts import (
    Envelope,
    EpochEvent,
    HealthSignal,
    KernelReady,
    SeedTransition,
    TamiyoDecision,
    Topic,
)
from esper.contracts import (
    SeedLifecycle as S,
)
from esper.oona import Oona, stop_embedded
from esper.urza import Urza
from esper.workspace import Workspace
from pipelines.daemon_bus import DaemonBus

ESPER = str(Path(sys.executable).parent / "esper")
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][A-Z0-9]|[=>])")
GROWTH = [S.DORMANT, S.GERMINATED, S.LOADING, S.TRAINING, S.GRAFTING, S.STABILIZATION,
          S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED]
KID = "abababababab-cpu-fast-0f1e2d"


@pytest.fixture
def ws():
    root = Path(tempfile.mkdtemp(prefix="nw", dir="/tmp"))  # the Redis socket path is short
    workspace = Workspace(root / "ws")
    workspace.create()
    Urza.open(workspace).close()
    yield workspace
    stop_embedded(workspace)
    shutil.rmtree(root, ignore_errors=True)


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    e["TERM"] = "xterm-256color"
    return e


class Pty:
    """The CLI on a pseudo-terminal of a given size; its output collected as it comes."""

    def __init__(self, args: list[str], cols: int, rows: int = 60):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env(),
                                     close_fds=True)
        os.close(slave)
        self.master, self.raw = master, bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return  # EIO: the child closed the terminal
            if not chunk:
                return
            self.raw += chunk

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def wait_for(self, needle: str, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.text.find(needle)
            if found >= 0:
                return found
            assert self.proc.poll() is None, f"watch exited early:\n{self.text[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} never showed:\n{self.text[-3000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=15)
        self.thread.join(timeout=5)
        os.close(self.master)
        return code


def health(run_id: str, stages: list[S], epoch: int) -> HealthSignal:
    n = len(stages)
    return HealthSignal(run_id=run_id, layer_id=1, layer_name="layers.1", epoch=epoch,
                        step=epoch * 7, lifecycle=stages, activation_mean=[0.0] * n,
                        activation_variance=[1.0] * n, dead_ratio=[0.0] * n,
                        gradient_energy=[0.1] * n, is_ready_for_transition=[False] * n)


def epoch_event(run_id: str, epoch: int, fossilized: int = 0) -> EpochEvent:
    return EpochEvent(run_id=run_id, epoch=epoch, global_step=epoch * 7, train_loss=1 / epoch,
                      validation_loss=1.1 / epoch, validation_accuracy=0.5 + epoch / 100,
                      fossilized_seeds=fossilized, epoch_seconds=0.2)


def grow(bus: Oona, run_id: str, until: S, start: S = S.DORMANT, epoch: int = 2) -> None:
    """Seed 1:0 of `run_id` moves stage by stage from `start` to `until`."""
    path = GROWTH[GROWTH.index(start):GROWTH.index(until) + 1]
    bus.publish_many([(Topic.LIFECYCLE_SEED_TRANSITIONS,
                       SeedTransition(run_id=run_id, seed_id="1:0", epoch=epoch, from_stage=a,
                                      to_stage=b, kernel_artifact_id=KID))
                      for a, b in itertools.pairwise(path)])


def test_dashboard_in_a_pty_shows_a_run_seeds_moving_through_stages(ws):
    term = Pty([ESPER, "--workspace", str(ws.root), "watch", "--refresh", "0.1"], cols=120)
    term.wait_for("no runs seen")
    with Oona.connect(ws, sender_id="tolaria") as bus:
        forge = DaemonBus(bus, group="tezzeret", wake_topic=Topic.COMPILATION_BLUEPRINT_SUBMITTED,
                          worker_id="forge-pty", log=logging.getLogger("t"), poll_interval_s=0.1)
        forge.publish(Topic.COMPILATION_KERNEL_READY, KernelReady(
            kernel_artifact_id=KID, blueprint_id="ab" * 32, pipeline="fast", target="cpu"))
        bus.publish_many([(Topic.TELEMETRY_SEED_HEALTH, health("grow", [S.DORMANT] * 2, 1)),
                          (Topic.SYSTEM_EVENTS_EPOCH, epoch_event("grow", 1))])
        dormant = term.wait_for("DORMANT:2")
        bus.publish(Topic.CONTROL_TAMIYO_DECISIONS, TamiyoDecision(
            decision_id="d1", run_id="grow", epoch=2, action="germinate", seed_id="1:0",
            kernel_artifact_id=KID, explanation="validation loss plateaued for 1 epoch"))
        grow(bus, "grow", S.GRAFTING)
        grafting = term.wait_for("GRAFTING:1")
        grow(bus, "grow", S.FOSSILIZED, start=S.GRAFTING, epoch=5)
        bus.publish(Topic.SYSTEM_EVENTS_EPOCH, epoch_event("grow", 5, fossilized=1))
        fossilized = term.wait_for("FOSSILIZED:1")
        term.wait_for("plateaued")
        term.wait_for("forge-pty")  # the forge's heartbeat
        assert dormant < grafting < fossilized
    assert term.stop() == 0
    assert "Traceback" not in term.text


def test_narrow_terminal_folds_instead_of_breaking(ws):
    with Oona.connect(ws, sender_id="tolaria") as bus:
        bus.publish_many([(Topic.TELEMETRY_SEED_HEALTH, health("a-run-with-a-long-name",
                                                                [S.DORMANT] * 3, 1)),
                          (Topic.SYSTEM_EVENTS_EPOCH, epoch_event("a-run-with-a-long-name", 1))])
        grow(bus, "a-run-with-a-long-name", S.TRAINING)
    term = Pty([ESPER, "--workspace", str(ws.root), "watch", "--refresh", "0.1", "--for", "1.5"],
               cols=36)
    assert term.proc.wait(timeout=20) == 0
    term.thread.join(timeout=5)
    os.close(term.master)
    # Each redraw moves the cursor up: split frames at the escape codes to measure lines.
    lines = ANSI.sub("\n", term.raw.decode("utf-8", "replace")).replace("\r", "\n").split("\n")
    assert "Traceback" not in term.text
    assert max(len(line) for line in lines) <= 36, [l for l in lines if len(l) > 36]
    assert "TRAINING" in term.text.replace("\n", "").replace("│", "").replace(" ", "") or \
        "TRAIN" in term.text


def run(ws: Workspace, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([ESPER, "--workspace", str(ws.root), *args], check=False,
                          capture_output=True, text=True, timeout=timeout, env=env())


def test_json_lines_parse_back_into_the_published_envelopes_and_filters_apply(ws):
    with Oona.connect(ws, sender_id="tolaria") as bus:
        ids = bus.publish_many([(Topic.SYSTEM_EVENTS_EPOCH, epoch_event("r1", 1)),
                                (Topic.SYSTEM_EVENTS_EPOCH, epoch_event("r2", 1)),
                                (Topic.TELEMETRY_SEED_HEALTH, health("r2", [S.DORMANT], 1))])
        grow(bus, "r2", S.TRAINING)
        published = {e.envelope.event_id: e.envelope for t in Topic for e in bus.range(t)}
    result = run(ws, "watch", "--once", "--json", "--since", "all")
    assert result.returncode == 0, result.stderr
    envelopes = [Envelope.from_json(line) for line in result.stdout.splitlines()]
    assert {e.event_id for e in envelopes} == set(published)
    assert all(published[e.event_id] == e for e in envelopes)
    assert set(ids) <= {e.event_id for e in envelopes}
    # The root's --json says the same; --topics and --run narrow it.
    result = run(ws, "--json", "watch", "--once", "--topics", "system.events.epoch",
                 "--run", "r2")
    [only] = [Envelope.from_json(line) for line in result.stdout.splitlines()]
    assert only.topic is Topic.SYSTEM_EVENTS_EPOCH and only.payload.run_id == "r2"
    bad = run(ws, "watch", "--once", "--topics", "no.such.topic")
    assert bad.returncode == 2 and "no.such.topic" in bad.stderr
    # Plain lines on a pipe.
    plain = run(ws, "watch", "--once", "--run", "r2")
    assert "run r2 seed 1:0 LOADING -> TRAINING" in plain.stdout and "r1" not in plain.stdout


class Follower:
    """`esper watch --follow` on pipes, its stdout lines collected as they come."""

    def __init__(self, ws: Workspace, *args: str):
        self.proc = subprocess.Popen([ESPER, "--workspace", str(ws.root), "watch", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env())
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: [k.append(x) for x in s],
                             daemon=True).start()

    def wait_for(self, pattern: str, where: str = "out", timeout: float = 15) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.out if where == "out" else self.err):
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, "".join(self.err)
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} never showed: {''.join(self.out + self.err)[-2000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


def test_metrics_endpoint_scraped_and_parsed(ws):
    watch = Follower(ws, "--metrics-port", "0", "--refresh", "0.1")
    port = int(watch.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", "err")[1])
    with Oona.connect(ws, sender_id="tolaria") as bus:
        bus.publish_many([(Topic.TELEMETRY_SEED_HEALTH, health("m", [S.DORMANT] * 2, 1)),
                          (Topic.SYSTEM_EVENTS_EPOCH, epoch_event("m", 1))])
        grow(bus, "m", S.GRAFTING)
        watch.wait_for("GERMINATED -> LOADING")
        families = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            families = {f.name: f for f in text_string_to_metric_families(body.decode())}
            seeds = {(s.labels["stage"], s.value) for s in families["esper_seeds"].samples}
            if seeds == {("GRAFTING", 1.0), ("DORMANT", 1.0)}:  # the watcher folds events in as they come
                break
            time.sleep(0.1)
    assert watch.stop() == 0
    assert seeds == {("GRAFTING", 1.0), ("DORMANT", 1.0)}
    assert families["esper_bus_events"].type == "counter"
    events = {s.labels["topic"]: s.value for s in families["esper_bus_events"].samples
              if s.name == "esper_bus_events_total"}
    assert events["lifecycle.seed.transitions"] == 4
    assert families["esper_epoch_seconds"].type == "histogram"
    assert any(s.name == "esper_epoch_seconds_count" and s.value == 1
               for s in families["esper_epoch_seconds"].samples)
    assert {s.labels["split"]: s.value for s in families["esper_run_loss"].samples} == \
        {"train": 1.0, "validation": 1.1}
    assert families["esper_bus_up"].samples[0].value == 1


def test_follow_rides_out_a_redis_restart(ws):
    watch = Follower(ws, "--refresh", "0.1")
    with Oona.connect(ws, sender_id="tolaria") as bus:
        time.sleep(1.0)  # the watcher is reading
        bus.publish(Topic.SYSTEM_EVENTS_EPOCH, epoch_event("r", 1))
        watch.wait_for("run r epoch 1 ")
    assert stop_embedded(ws)
    time.sleep(0.5)
    with Oona.connect(ws, sender_id="tolaria") as bus:  # starts the server again (AOF)
        bus.publish(Topic.SYSTEM_EVENTS_EPOCH, epoch_event("r", 2))
        watch.wait_for("run r epoch 2 ")
    assert watch.stop() == 0
    assert sum("run r epoch 1 " in line for line in watch.out) == 1


def test_audit_reports_the_first_broken_link_of_a_run(ws):
    with Urza.open(ws) as urza:
        urza.register_run("other", json.dumps({"epochs": 1}))
        urza.register_run("audited", json.dumps({"epochs": 3}))
        for epoch in (1, 2):
            urza.record_decision(TamiyoDecision(
                decision_id=f"d{epoch}", run_id="audited", epoch=epoch, action="wait",
                explanation="no plateau yet"))
        seq = urza.audit_rows(subjects=["d2"])[0]["seq"]
    result = run(ws, "watch", "--audit", "audited")
    assert result.returncode == 0 and "3 audit rows check out" in result.stdout
    conn = sqlite3.connect(ws.db_path)
    for (trigger,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                   "AND tbl_name = 'audit_log'").fetchall():
        conn.execute(f"DROP TRIGGER {trigger}")
    conn.execute("UPDATE audit_log SET details = ? WHERE seq = ?",
                 (json.dumps({"run_id": "audited", "explanation": "rewritten"}), seq))
    conn.commit()
    conn.close()
    result = run(ws, "watch", "--audit", "audited")
    assert result.returncode == 3
    assert f"audit row {seq}" in result.stderr and "edited" in result.stderr
    result = run(ws, "--json", "watch", "--audit", "audited")
    assert json.loads(result.stdout)["first_bad_seq"] == seq and result.returncode == 3
    # A run whose own rows are all before the edit still checks out.
    assert run(ws, "watch", "--audit", "other").returncode == 0
    assert run(ws, "watch", "--audit", "nobody").returncode == 2


def transitions_listed(screen: str) -> list[tuple[str, str, str]]:
    """(seed, from, to) of the transitions panel's rows in the last frame drawn, run ptyrun."""
    panel = screen[screen.rfind("seed transitions"):]
    panel = panel[:panel.find("Tamiyo decisions")]
    return re.findall(r"ptyrun\s*│\s*\d+\s*│\s*(\d+:\d+)\s*│\s*([A-Z_]+) -> ([A-Z_]+)", panel)


def test_dashboard_in_a_pty_follows_a_real_training_and_forge(tmp_path):
    """The real thing: `esper train` (bus telemetry on) grows a seed on a workspace of VALIDATED
    kernels while `esper forge --once` compiles an imported blueprint; the dashboard, in a
    pseudo-terminal, lists every stage change the run published, in lifecycle order, and the
    forge's kernel and heartbeat."""
    root = short_dir("nwt-")
    workspace, _ = forged_workspace(root)
    term = forge = train = None
    try:
        config = tmp_path / "tiny.yaml"
        # 7 steps an epoch: stages that fall between two redraws (the stage counts skip them)
        # are still listed in the transitions panel.
        config.write_text(yaml.safe_dump(tiny_config(**{"telemetry.bus": True}).model_dump(
            mode="json")))
        ir_file = tmp_path / "mlp_relu_w4.json"
        ir_file.write_bytes(canonical_json(next(ir for ir in standard_library()
                                                 if ir.name == "mlp_relu_w4")))
        imported = run(workspace, "library", "import", str(ir_file), timeout=60)
        assert imported.returncode == 0, imported.stderr

        term = Pty([ESPER, "--workspace", str(workspace.root), "watch", "--refresh", "0.1"],
                   cols=200, rows=80)
        term.wait_for("no runs seen", timeout=30)
        base = [ESPER, "--workspace", str(workspace.root)]
        forge = subprocess.Popen(base + ["--json", "forge", "--once", "--worker-id", "forge-pty",
                                         "--interface", "linear:32:16", "--pipelines", "fast",
                                         "--max-jobs", "1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        train = subprocess.Popen(base + ["--json", "train", str(config), "--run-id", "ptyrun"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = train.communicate(timeout=120)
        assert train.returncode == 0, err
        assert json.loads(out)["outcomes"] == {"FOSSILIZED": 1}
        out, err = forge.communicate(timeout=120)
        assert forge.returncode == 0, err

        # What the run did, as the screen shows it once everything has been read.
        term.wait_for("12/12", timeout=30)
        fossilized = term.wait_for("FOSSILIZED:1", timeout=30)
        term.wait_for("forge-pty", timeout=30)  # the forge's heartbeat, in the daemons table
        term.wait_for("germinate", timeout=30)  # Tamiyo's decision, with its explanation
        screen = term.text
        # The stage counts are sampled at each redraw: the stages they showed (some, maybe not
        # all) came in lifecycle order.
        firsts = {s: screen.find(f"{s.value}:1") for s in GROWTH[1:]}
        stages = [s for _, s in sorted((at, s) for s, at in firsts.items() if at >= 0)]
        assert stages == sorted(stages, key=GROWTH.index), stages
        assert stages[-1] is S.FOSSILIZED and firsts[S.FOSSILIZED] == fossilized
        # The transitions panel lists every one the run published, in order: the seed's whole
        # path from DORMANT to FOSSILIZED, stage by stage.
        with Oona.connect(workspace, sender_id="test") as bus:
            published = [(e.envelope.payload.seed_id, e.envelope.payload.from_stage.value,
                          e.envelope.payload.to_stage.value)
                         for e in bus.range(Topic.LIFECYCLE_SEED_TRANSITIONS)
                         if e.envelope.payload.run_id == "ptyrun"]
        path = [published[0][1]] + [to for _, _, to in published]
        assert path == [s.value for s in GROWTH], published
        deadline = time.monotonic() + 30
        while (listed := transitions_listed(term.text)) != published:
            assert time.monotonic() < deadline, f"{listed} != {published}:\n{term.text[-4000:]}"
            time.sleep(0.05)
        # The forge's activity: its kernel counted in the pipeline table.
        deadline = time.monotonic() + 30
        while not any(float(r) > 0 for r in re.findall(r"forge\s*│\s*([0-9.]+) kernels/min",
                                                         term.text)):
            assert time.monotonic() < deadline, f"no forge kernel shown:\n{term.text[-4000:]}"
            time.sleep(0.05)
    finally:
        for proc in (train, forge):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        if term is not None:
            code = term.stop()
            assert code == 0 and "Traceback" not in term.text
        stop_embedded(workspace)
        shutil.rmtree(root, ignore_errors=True)

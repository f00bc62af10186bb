"""Oona benchmark: publish throughput and publish-to-consume latency, embedded and over TCP.

    python scripts/bench_bus.py                 # ~3 minutes on 2 cores; writes docs/bench-bus.json
    python scripts/bench_bus.py --quick         # a smoke run of a few seconds

Two buses with the same persistence (AOF, fsync every second): the embedded redis-server on
its Unix socket, and a second redis-server on a free loopback TCP port. Payloads are what
training sends: a HealthSignal for a 64-seed layer (6.5 KB of JSON) and a small EpochEvent
(0.4 KB).

- Throughput: messages per second through `publish_many` (one pipelined round trip per batch),
  through `publish` (one round trip per message) for comparison, and through
  `publish_envelopes` with envelopes built beforehand (the bus alone, without the pydantic
  wrapping that every real publish pays).
- Latency: a consumer in another process reads with XREADGROUP BLOCK and acknowledges; the
  publisher sends single messages at a fixed rate. Latency = receive time (after parsing)
  minus the envelope's timestamp: wrapping, XADD, delivery and parsing, all of it.

Targets (DESIGN.md section 16): > 50K msg/s batched, p99 < 10 ms on loopback.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
import redis.utils
from rich.console import Console
from rich.table import Table

from esper.contracts import (
    EpochEvent,
    HealthSignal,
    SeedLifecycle,
    Topic,
    VersionedContract,
)
from esper.oona import Oona, stop_embedded
from esper.oona.embedded import redis_server_binary
from esper.workspace import Workspace

SEEDS_PER_LAYER = 64
console = Console()


# Payloads ----------------------------------------------------------------------------------------

def health_signal(step: int) -> HealthSignal:
    rng = random.Random(step)
    n = SEEDS_PER_LAYER
    return HealthSignal(run_id="bench", layer_id=step % 12, layer_name=f"blocks.{step % 12}.mlp",
                        epoch=step // 1000, step=step, lifecycle=[SeedLifecycle.DORMANT] * n,
                        activation_mean=[rng.gauss(0, 1) for _ in range(n)],
                        activation_variance=[rng.random() for _ in range(n)],
                        dead_ratio=[rng.random() * 0.1 for _ in range(n)],
                        gradient_energy=[rng.random() for _ in range(n)],
                        is_ready_for_transition=[False] * n)


def epoch_event(step: int) -> EpochEvent:
    return EpochEvent(run_id="bench", epoch=step, global_step=step * 100,
                      train_loss=1.0 / (step + 1), validation_loss=1.1 / (step + 1),
                      validation_accuracy=0.5, learning_rate=3e-4)


PAYLOADS: dict[str, tuple[Topic, Callable[[int], VersionedContract]]] = {
    "health64": (Topic.TELEMETRY_SEED_HEALTH, health_signal),
    "epoch": (Topic.SYSTEM_EVENTS_EPOCH, epoch_event),
}


# Buses -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bus:
    name: str
    workspace: str | None  # what a consumer process needs to connect
    url: str | None

    def connect(self, sender_id: str) -> Oona:
        workspace = Workspace(Path(self.workspace)) if self.workspace else None
        return Oona.connect(workspace, self.url, sender_id=sender_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tcp_server(directory: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server on loopback with the embedded server's persistence settings."""
    port = free_port()
    proc = subprocess.Popen([str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(directory), "--appendonly", "yes",
                             "--appendfsync", "everysec", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


# Throughput --------------------------------------------------------------------------------------

@dataclass
class ThroughputResult:
    bus: str
    payload: str
    mode: str  # batched | unbatched | prewrapped
    messages: int
    batch: int
    msgs_per_s: list[float]  # one per repetition

    @property
    def median(self) -> float:
        return statistics.median(self.msgs_per_s)


def publish_rate(oona: Oona, payload: str, mode: str, messages: int, batch: int) -> float:
    topic, make = PAYLOADS[payload]
    oona.redis.delete(topic.stream_key)  # same starting point for every repetition
    if mode == "prewrapped":
        envelopes = [oona.wrap(topic, make(i)) for i in range(messages)]
        started = time.perf_counter()
        for i in range(0, messages, batch):
            oona.publish_envelopes(envelopes[i:i + batch])
    elif mode == "batched":
        started = time.perf_counter()
        for i in range(0, messages, batch):
            oona.publish_many([(topic, make(j)) for j in range(i, min(i + batch, messages))])
    else:
        started = time.perf_counter()
        for i in range(messages):
            oona.publish(topic, make(i))
    elapsed = time.perf_counter() - started
    oona.redis.delete(topic.stream_key)
    return messages / elapsed


# Latency -----------------------------------------------------------------------------------------

@dataclass
class LatencyResult:
    bus: str
    rate_per_s: int
    messages: int
    received: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    load_average: float  # 1-minute load average at the end of the run: the machine is shared
    samples_ms: list[float]


def consume_and_time(bus: Bus, expected: int, ready, results) -> None:
    """Consumer process: XREADGROUP BLOCK, parse, ack; record receive time - envelope time."""
    with bus.connect("bench-consumer") as oona:
        topics = [Topic.TELEMETRY_SEED_HEALTH, Topic.SYSTEM_EVENTS_EPOCH]
        consumer = oona.consumer("bench-latency", topics, "consumer-1", start_id="$")
        ready.set()
        latencies: list[float] = []
        deadline = time.monotonic() + 120
        while len(latencies) < expected and time.monotonic() < deadline:
            deliveries = consumer.read(count=100, block_ms=200)
            received_at = time.time()  # same clock as the envelope's utcnow(): one machine
            latencies += [(received_at - d.envelope.timestamp.timestamp()) * 1000
                          for d in deliveries]
            consumer.ack(*deliveries)
        for topic in topics:
            oona.redis.xgroup_destroy(topic.stream_key, "bench-latency")
    results.put(latencies)


def measure_latency(bus: Bus, rate: int, seconds: float) -> LatencyResult:
    messages = int(rate * seconds)
    context = multiprocessing.get_context("spawn")
    ready, results = context.Event(), context.Queue()
    consumer = context.Process(target=consume_and_time, args=(bus, messages, ready, results))
    consumer.start()
    if not ready.wait(60):
        raise RuntimeError("the consumer process did not start")
    kinds = list(PAYLOADS.values())
    with bus.connect("bench-publisher") as oona:
        started = time.perf_counter()
        for i in range(messages):
            # Pace to the rate: sleep until this message's slot instead of bursting.
            slot = started + i / rate
            if (wait := slot - time.perf_counter()) > 0:
                time.sleep(wait)
            topic, make = kinds[i % len(kinds)]
            oona.publish(topic, make(i))
        samples = results.get(timeout=180)
        consumer.join(timeout=30)
        for topic, _ in kinds:
            oona.redis.delete(topic.stream_key)
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return LatencyResult(bus.name, rate, messages, len(samples), pct(0.50), pct(0.90), pct(0.99),
                         ordered[-1], os.getloadavg()[0], [round(s, 3) for s in samples])


# Report ------------------------------------------------------------------------------------------

def hardware() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except FileNotFoundError:
        model = platform.processor()
    return {"cpu": model, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "redis_py": redis.__version__,
            "hiredis": redis.utils.HIREDIS_AVAILABLE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench-bus.json"),
                        help="where the raw numbers go (JSON)")
    parser.add_argument("--messages", type=int, default=20_000, help="messages per batched run")
    parser.add_argument("--unbatched-messages", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=500, help="messages per pipeline")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rates", default="1000,2000", help="latency runs, messages per second")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of a latency run")
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.unbatched_messages, args.repeat, args.seconds = 2_000, 500, 1, 1.0
    rates = [int(r) for r in args.rates.split(",")]

    # Other processes on the machine skew every number here: the load average goes in the report.
    load_before = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="oona-bench-", dir="/tmp"))
    workspace = Workspace(scratch / "ws")
    tcp_server, tcp_url = start_tcp_server(scratch)
    buses = [Bus("embedded/unix", str(workspace.root), None),
             Bus("tcp/loopback", None, tcp_url)]
    throughput: list[ThroughputResult] = []
    latency: list[LatencyResult] = []
    try:
        for bus in buses:
            # Latency first, while the server's AOF is small: the throughput runs write
            # hundreds of MB, and the kernel's writeback of them would land in these samples.
            for rate in rates:
                result = measure_latency(bus, rate, args.seconds)
                latency.append(result)
                console.print(f"{bus.name:14} latency at {rate}/s: p50 {result.p50_ms:.2f} ms, "
                              f"p99 {result.p99_ms:.2f} ms (load {result.load_average:.2f})",
                              soft_wrap=True)
            with bus.connect("bench") as oona:
                server_version = oona.redis.info("server")["redis_version"]
                for payload in PAYLOADS:
                    for mode, messages in (("batched", args.messages),
                                           ("prewrapped", args.messages),
                                           ("unbatched", args.unbatched_messages)):
                        batch = 1 if mode == "unbatched" else args.batch
                        rates_seen = [publish_rate(oona, payload, mode, messages, batch)
                                      for _ in range(args.repeat)]
                        result = ThroughputResult(bus.name, payload, mode, messages, batch,
                                                  rates_seen)
                        throughput.append(result)
                        console.print(f"{bus.name:14} {payload:9} {mode:10} "
                                      f"{result.median:>10,.0f} msg/s")
    finally:
        stop_embedded(workspace)
        tcp_server.kill()
        tcp_server.wait()
        shutil.rmtree(scratch, ignore_errors=True)

    table = Table(title="Oona publish throughput (median of repetitions)")
    for column in ("bus", "payload", "mode", "batch", "msg/s"):
        table.add_column(column, justify="right" if column in ("batch", "msg/s") else "left")
    for r in throughput:
        table.add_row(r.bus, r.payload, r.mode, str(r.batch), f"{r.median:,.0f}")
    console.print(table)
    table = Table(title="Publish-to-consume latency (ms), consumer in another process")
    for column in ("bus", "rate/s", "received", "p50", "p90", "p99", "max", "load"):
        table.add_column(column, justify="left" if column == "bus" else "right")
    for r in latency:
        table.add_row(r.bus, str(r.rate_per_s), f"{r.received}/{r.messages}", f"{r.p50_ms:.2f}",
                      f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.max_ms:.2f}",
                      f"{r.load_average:.2f}")
    console.print(table)

    report = {"hardware": hardware() | {"redis_server": server_version},
              "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "throughput": [asdict(r) | {"median_msgs_per_s": r.median} for r in throughput],
              "latency": [asdict(r) for r in latency]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Compact: thousands of latency samples, one per line, would make a 250 KB file.
    args.out.write_text(json.dumps(report, separators=(",", ":")) + "\n")
    console.print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()

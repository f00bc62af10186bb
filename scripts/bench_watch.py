"""Does `esper watch` load the bus? Publish throughput with and without a watcher attached.

    python scripts/bench_watch.py            # ~2 minutes on 2 cores; writes docs/bench-watch.json
    python scripts/bench_watch.py --quick    # a smoke run

The embedded bus of a fresh workspace; the publisher is scripts/bench_bus.py's (`publish_rate`,
its payloads: a 64-seed HealthSignal of 6.5 KB batched by 100, a 0.4 KB EpochEvent one round trip
each). The watcher is the real CLI in its own process, in one of two ways:

- dashboard: `esper watch --follow` on a pseudo-terminal (default --refresh 1), what an operator
  looks at; its screen output is read and dropped by this script;
- json: `esper --json watch --follow --refresh 0.5`, every event parsed and printed as a JSON
  line to /dev/null (the most work per event of its outputs).

Conditions rotate, repetition by repetition, so drift of the machine hits all alike; the table
gives the median and the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bus import hardware, publish_rate
from rich.console import Console
from rich.table import Table

from esper.oona import Oona, stop_embedded
from esper.workspace import Workspace

ESPER = str(Path(sys.executable).parent / "esper")
console = Console()


CONDITIONS = ("alone", "dashboard", "json")


def start_watch(ws: Workspace, how: str) -> subprocess.Popen:
    if how == "json":
        proc = subprocess.Popen([ESPER, "--workspace", str(ws.root), "--json", "watch",
                                 "--follow", "--refresh", "0.5", "--since", "1s"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2.5)  # started and tailing (imports, backlog read)
    else:
        master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "60"}
        proc = subprocess.Popen([ESPER, "--workspace", str(ws.root), "watch", "--follow",
                                 "--since", "1s"], stdin=slave, stdout=slave, stderr=slave,
                                env=env, close_fds=True)
        os.close(slave)
        drawn = threading.Event()

        def drain() -> None:
            seen = b""
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                if not drawn.is_set():
                    seen += chunk
                    drawn.set() if b"bus ok" in seen else None
            os.close(master)

        threading.Thread(target=drain, daemon=True).start()
        if not drawn.wait(timeout=30):
            raise RuntimeError("the dashboard never drew")
    assert proc.poll() is None, "esper watch exited"
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="docs/bench-watch.json")
    args = parser.parse_args()
    reps = 2 if args.quick else 5
    cases = [("health64", "batched", 2_000 if args.quick else 20_000, 100),
             ("epoch", "single", 2_000 if args.quick else 20_000, 1)]
    root = Path(tempfile.mkdtemp(prefix="bw", dir="/tmp"))
    ws = Workspace(root / "ws")
    ws.create()
    rates: dict[str, dict[str, list[float]]] = {f"{p} {m}": {c: [] for c in CONDITIONS}
                                                for p, m, _, _ in cases}
    try:
        with Oona.connect(ws, sender_id="bench") as oona:
            for p, m, n, b in cases:  # warm up the server and the payload builders
                publish_rate(oona, p, m, min(n, 500), b)
            for rep in range(reps):
                for k in range(len(CONDITIONS)):
                    condition = CONDITIONS[(rep + k) % len(CONDITIONS)]
                    watcher = start_watch(ws, condition) if condition != "alone" else None
                    try:
                        for p, m, n, b in cases:
                            rates[f"{p} {m}"][condition].append(publish_rate(oona, p, m, n, b))
                    finally:
                        if watcher is not None:
                            watcher.terminate()
                            watcher.wait(timeout=30)
    finally:
        stop_embedded(ws)
        shutil.rmtree(root, ignore_errors=True)

    table = Table(title="bus publish throughput, msg/s (embedded Redis; median of "
                  f"{reps}, min-max)", title_justify="left")
    for column in ("case", "alone", "dashboard", "dashboard / alone", "--json",
                   "--json / alone"):
        table.add_column(column, justify="right" if column != "case" else "left")
    summary = {}

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"

    for case, by in rates.items():
        medians = {c: statistics.median(by[c]) for c in CONDITIONS}
        summary[case] = {"medians": medians, "runs": by,
                         "ratios": {c: medians[c] / medians["alone"] for c in CONDITIONS[1:]}}
        table.add_row(case, cell(by["alone"]), cell(by["dashboard"]),
                      f"{medians['dashboard'] / medians['alone']:.2f}", cell(by["json"]),
                      f"{medians['json'] / medians['alone']:.2f}")
    console.print(table)
    Path(args.out).write_text(json.dumps({"hardware": hardware(), "repetitions": reps,
                                          "cases": summary}, indent=2) + "\n")
    console.print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()

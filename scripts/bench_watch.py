"""Does `esper watch` load the bus? Publish throughput with and without a watcher attached.

    python scripts/bench_watch.py            # ~1 minute on 2 cores; writes docs/bench-watch.json
    python scripts/bench_watch.py --quick    # a smoke run of a few seconds

The embedded bus of a fresh workspace; the publisher is scripts/bench_bus.py's (`publish_rate`,
its payloads: a 64-seed HealthSignal of 6.5 KB batched by 100, a 0.4 KB EpochEvent one round trip
each). The watcher is the real CLI, `esper --json watch --follow`, in its own process, printing
every event it reads as a JSON line to /dev/null (the most work per event of its outputs) and
re-reading Urza and XINFO every 0.5 s. Conditions alternate, repetition by repetition, so drift
of the machine hits both alike; the table gives the median and the spread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bus import hardware, publish_rate  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from esper.oona import Oona, stop_embedded  # noqa: E402
from esper.workspace import Workspace  # noqa: E402

ESPER = str(Path(sys.executable).parent / "esper")
console = Console()


def start_watch(ws: Workspace) -> subprocess.Popen:
    proc = subprocess.Popen([ESPER, "--workspace", str(ws.root), "--json", "watch", "--follow",
                             "--refresh", "0.5", "--since", "1s"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.5)  # started and tailing (imports, backlog read)
    assert proc.poll() is None, "esper watch exited"
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="docs/bench-watch.json")
    args = parser.parse_args()
    reps = 2 if args.quick else 5
    cases = [("health64", "batched", 2_000 if args.quick else 20_000, 100),
             ("epoch", "single", 500 if args.quick else 4_000, 1)]
    root = Path(tempfile.mkdtemp(prefix="bw", dir="/tmp"))
    ws = Workspace(root / "ws")
    ws.create()
    rates: dict[str, dict[str, list[float]]] = {f"{p} {m}": {"alone": [], "watched": []}
                                                for p, m, _, _ in cases}
    try:
        with Oona.connect(ws, sender_id="bench") as oona:
            for p, m, n, b in cases:  # warm up the server and the payload builders
                publish_rate(oona, p, m, min(n, 500), b)
            for rep in range(reps):
                for condition in (("alone", "watched") if rep % 2 == 0 else ("watched", "alone")):
                    watcher = start_watch(ws) if condition == "watched" else None
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
    for column in ("case", "alone", "with esper watch", "watched / alone"):
        table.add_column(column, justify="right" if column != "case" else "left")
    summary = {}
    for case, by in rates.items():
        alone, watched = statistics.median(by["alone"]), statistics.median(by["watched"])
        summary[case] = {"alone_median": alone, "watched_median": watched,
                         "ratio": watched / alone, "alone": by["alone"], "watched": by["watched"]}
        table.add_row(case, f"{alone:,.0f} ({min(by['alone']):,.0f}-{max(by['alone']):,.0f})",
                      f"{watched:,.0f} ({min(by['watched']):,.0f}-{max(by['watched']):,.0f})",
                      f"{watched / alone:.2f}")
    console.print(table)
    Path(args.out).write_text(json.dumps({"hardware": hardware(), "repetitions": reps,
                                          "cases": summary}, indent=2) + "\n")
    console.print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()

"""How far a static model of the growth goal's size can go: the growth benchmark's
`static_adapters` arm sized to a share of the large host's extra parameters (default 25% and
50%) instead of to Esper's, and a plain static host whose hidden layers are widened alike (the
widest whose parameters fit the same share), each trained exactly as the sweep trains its arms.

    python scripts/growth_adapter_ceiling.py                # MNIST-1D and digits, 3 seeds
    python scripts/growth_adapter_ceiling.py --shares 0.25 --tasks digits --kinds static
    python scripts/growth_adapter_ceiling.py --tasks mnist1d --kinds --widths 208,16 80,80

`--widths` adds static hosts of those exact hidden widths: what a set of grafts that widen the
small host amounts to, trained from the first step (docs/growth.md, wider grafts).

Both train from the first step with the whole budget, so their gap closed is what the goal asks
growth to match with capacity that arrives later (docs/growth.md). At 25-50% of the
parameters digits over-fits late; Tamiyo's divergence rule tells that from a divergence (the
training loss does not rise with it), so these runs keep the rule as the sweep has it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_growth

from esper.tolaria.config import TrainConfig
from esper.tolaria.data import DataBundle, build_data
from esper.tolaria.models import build_model
from esper.tolaria.run import run_training


def run(bench: dict, task: str, kind: str, share: float | str, seed: int, out: str) -> dict:
    """One run. `share` is the budget's share of the large host's extra parameters, or for
    `kind` "widths" the hidden widths themselves ("208,16")."""
    spec = bench["tasks"][task]
    data = build_data(spec["data"], seed=seed)
    small, large = (TrainConfig.from_mapping(bench_growth.train_config(bench, task, arm, seed, "cpu", out))
                    for arm in ("static_small", "static_large"))
    base = _parameters(small, data)
    extra = _parameters(large, data) - base
    if kind == "adapters":
        width = bench_growth.adapter_width(spec["small"], share * extra, math.prod(data.input_shape))
        config = bench_growth.train_config(bench, task, "static_adapters", seed, "cpu", out, adapter_width=width)
    else:
        widths = [int(w) for w in share.split(",")] if kind == "widths" else \
            [_static_width(bench, task, seed, out, data, base + share * extra)] * len(spec["small"])
        width = widths[0] if kind == "static" else share
        config = bench_growth.train_config({**bench, "tasks": {task: {**spec, "large": widths}}},
                                           task, "static_large", seed, "cpu", out)
    result = run_training(TrainConfig.from_mapping(config), workspace=None)
    last = result.history.epochs[-1]
    return {"task": task, "kind": kind, "share": share, "seed": seed, "width": width,
            "added": last["parameters"] - base, "extra": extra,
            "accuracy": last["validation_accuracy"]}


def _static_width(bench: dict, task: str, seed: int, out: str, data: DataBundle, budget: float) -> int:
    """The widest hidden layers (all alike) whose static host has at most `budget` parameters."""
    spec = bench["tasks"][task]
    width = max(spec["small"])
    while True:
        wider = {**bench, "tasks": {task: {**spec, "large": [width + 1] * len(spec["small"])}}}
        config = TrainConfig.from_mapping(bench_growth.train_config(wider, task, "static_large", seed, "cpu", out))
        if _parameters(config, data) > budget:
            return width
        width += 1


def _parameters(config: TrainConfig, data: DataBundle) -> int:
    return sum(p.numel() for p in build_model(config.model, data.input_shape, data.out_dim).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=bench_growth.FULL)
    parser.add_argument("--tasks", nargs="+", default=["mnist1d", "digits"])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--kinds", nargs="*", choices=["adapters", "static"], default=["adapters", "static"])
    parser.add_argument("--widths", nargs="+", default=[], metavar="W1,W2",
                        help="also static hosts of exactly these hidden widths")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the config's")
    parser.add_argument("--work", default=str(ROOT / ".bench-growth/adapter-ceiling"))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    bench = bench_growth.parse_yaml(args.config.read_text())
    seeds = args.seeds or bench["seeds"]
    jobs = [(t, k, s, seed) for t in args.tasks for k in args.kinds for s in args.shares for seed in seeds]
    jobs += [(t, "widths", w, seed) for t in args.tasks for w in args.widths for seed in seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, *zip(*[(bench, *j, args.work) for j in jobs])))
    print("task      kind      share  width  added/extra  accuracy per seed            mean (std)")
    for task, kind, share in dict.fromkeys((t, k, s) for t, k, s, _ in jobs):
        got = [r for r in rows if (r["task"], r["kind"], r["share"]) == (task, kind, share)]
        acc = [r["accuracy"] for r in got]
        budget = f"{got[0]['added'] / got[0]['extra']:.0%}" if kind == "widths" else f"{share:.0%}"
        print(f"{task:<9} {kind:<9} {budget:>5}  {got[0]['width']:>5}  {got[0]['added']:>5}/{got[0]['extra']:<6} "
              f"{' '.join(f'{a:.4f}' for a in acc):<28} {statistics.mean(acc):.4f} "
              f"({statistics.stdev(acc) if len(acc) > 1 else 0.0:.4f})")


if __name__ == "__main__":
    main()

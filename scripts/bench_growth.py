"""Does growth help? The growth benchmark (issue 8): arms side by side on the same data, budget
and seeds, with the numbers, a markdown table and plots written to docs/.

    python scripts/bench_growth.py --quick        # 2 tasks x 2 seeds: under 5 minutes on 2 cores
    python scripts/bench_growth.py                # configs/benchmarks/growth.yaml: 4 tasks x 3 seeds
    python scripts/bench_growth.py --config configs/benchmarks/growth-gpu.yaml --device cuda

Arms (each a `run_training` run, the function `esper train` calls, except gromo's):

- `static_small`: the undersized host, no seeds. `static_large`: the wide host, no seeds.
- `esper`: the small host with seeds in every hidden layer and the heuristic Tamiyo, TRAINING
  objective `reconstruction`; `esper_gradient_match`: the same with `gradient_match`. Any other
  `esper_*` arm is `esper` with the config's section of that name merged in (`esper_eager`:
  a seed germinated every epoch from the first, the lifecycle without the plateau's wait).
  A section's `budget_share: 0.25` gives Tamiyo a run-wide growth budget
  (`tamiyo.max_added_parameters`) of that share of the task's large host's extra parameters.
- `random_placement`: as `esper`, but Tamiyo draws the seed at random (`location.strategy:
  random`), capped at the number of germinations `esper` made at that seed. An arm
  `esper_X_random` is the control of `esper_X`: its own section sets `location.strategy:
  random` (drawn from the run's seed) and the goals compare the two (`esper_placement`: more
  seeds than grafts, so that where to grow is a real choice).
- `esper_spans` / `esper_widen` (configs): the small host built with `spans` (mlp `spans: true`),
  zero-output blocks from each hidden layer's input to the next layer's pre-activation, and
  seeds on them (`kasmina.blocks`), alone or with the layers' own: grafts that widen a layer.
- `static_adapters`: the small host with a zero-initialised parallel adapter on every hidden
  layer from the start (`mlp` `adapter_width`), sized to the mean parameters `esper` (or the
  config's `adapters_match` arm) added on that task: the PEFT-style alternative at the same
  parameter budget.
- `gromo`: the `gromo` package's TINY growth of the same small host (scripts/growth_gromo.py).

The continual split (the config's `continual` section; `--tasks continual` alone): phase 1
trains a host on the first classes; phase 2 starts each arm from it on the second classes
(`model.init_from`, `data.classes`): `finetune` trains the whole host, `esper` freezes it
(`model.freeze`) and grows seeds, `esper_head` likewise with seeds in the head only, one per
class logit (a graft then writes only its own class's logit), `esper_guard` and `esper_distill`
with the first classes guarded (`guard`, and `guard.distill`), `static_adapters` freezes it and
trains adapters at esper's budget. Accuracy on the first classes before and after, read over all classes and within the
first ones, gives the degradation after the germinations.

Metrics per run: the final validation accuracy (classification) or loss (regression), the
parameters added over the small host, the share of the small-to-large gap closed, germinations
by outcome, rollbacks, wall time, and the cosine drift of unmodified layers: for every hidden
layer that received no graft, `1 - cos` between its output and the output of the same layer
of `static_small` at the same seed (same initial weights, same data order) on the validation
inputs. A seed in TRAINING is isolated from the host, so any drift comes from grafts blending
in elsewhere and from what the host learned around them.

The workspace (`--workspace`, kept between invocations) holds the config's blueprints
(standard-library names, or IR files: entries ending in .json, relative to the config),
compiled by `esper forge --once` and validated by `esper bench --once` (the real gauntlet) for
every seed interface of the tasks; a second invocation reuses them.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esper.tolaria.config import parse_yaml

FULL = ROOT / "configs/benchmarks/growth.yaml"
QUICK = ROOT / "configs/benchmarks/growth-quick.yaml"
PHASE_TWO = ("random_placement", "static_adapters", "gromo")  # sized from the esper arm's runs
NO_SEEDS = {"kasmina": {"targets": []}}  # the arms that train the bare host: kasmina wraps nothing
ESPER_CLI = ("import sys; from esper_cli.main import main; sys.argv[0] = 'esper'; main()")


# --- config ---------------------------------------------------------------------------------

def grows(arm: str) -> bool:
    """Arms that train with seeds and Tamiyo, against the workspace's kernels."""
    return arm.startswith("esper") or arm == "random_placement"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`, recursively for mappings."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def train_config(bench: dict[str, Any], task: str, arm: str, seed: int, device: str, out_dir: str,
                 **extra: Any) -> dict[str, Any]:
    """The TrainConfig mapping of one (task, arm, seed) run."""
    spec = bench["tasks"][task]
    widths = spec["large"] if arm == "static_large" else spec["small"]
    model: dict[str, Any] = {"name": "mlp", "kwargs": {"widths": list(widths)}}
    if arm == "static_adapters":
        model["kwargs"]["adapter_width"] = extra["adapter_width"]
    config = merge(bench.get("common", {}), {
        "name": f"{task}-{arm}"[:64].replace("_", "-"), "seed": seed, "device": device,
        "epochs": spec["epochs"], "out_dir": out_dir, "model": model, "data": spec["data"]})
    if not grows(arm):
        return merge(config, NO_SEEDS)
    config = merge(config, bench["esper"])
    config = merge(config, bench.get(arm, {}) if arm.startswith("esper_") else {})
    share = config.pop("budget_share", None)
    if share is not None:
        config = merge(config, {"tamiyo": {"max_added_parameters": growth_budget(spec, share)}})
    if arm == "random_placement":
        config = merge(config, {"tamiyo": {
            "location": {"strategy": "random", "random_seed": seed},
            "max_germinations": extra["max_germinations"]}})
    location = config.get("tamiyo", {}).get("location", {})
    if location.get("strategy") == "random" and "random_seed" not in location:
        config = merge(config, {"tamiyo": {"location": {"random_seed": seed}}})  # a draw per seed
    return config


def growth_budget(spec: dict[str, Any], share: float) -> int:
    """`share` of the task's large host's extra parameters over its small one: an arm's
    `budget_share` as Tamiyo's run-wide `max_added_parameters`."""
    in_features, out_dim = _host_dims(json.dumps(spec["data"], sort_keys=True))

    def parameters(widths: list[int]) -> int:
        return sum(a * b + b for a, b in itertools.pairwise([in_features, *widths, out_dim]))

    return max(1, math.floor(share * (parameters(spec["large"]) - parameters(spec["small"]))))


@functools.cache
def _host_dims(data_spec: str) -> tuple[int, int]:
    """(input features, outputs) of a task's data (a JSON data spec, so it can be cached)."""
    from esper.tolaria.data import build_data

    data = build_data(json.loads(data_spec), seed=0)
    return math.prod(data.input_shape), data.out_dim


def continual_config(bench: dict[str, Any], arm: str, seed: int, device: str, out_dir: str, *,
                     phase: int, **extra: Any) -> dict[str, Any]:
    """The TrainConfig mapping of one run of the continual split: phase 1 trains the host on the
    first classes; phase 2 starts every arm from that host (`init_from`) on the second classes.
    `finetune` trains the whole host; the esper arms and `static_adapters` freeze it
    (`model.freeze`), so only seeds or adapters learn. An `esper_*` arm is `esper` with the
    continual section's entry of that name merged over it."""
    spec = bench["continual"]
    model: dict[str, Any] = {"name": "mlp", "kwargs": {"widths": list(spec["widths"])}}
    config = merge(bench.get("common", {}), {
        "name": f"continual-{arm}-p{phase}".replace("_", "-"), "seed": seed, "device": device,
        "epochs": spec["epochs"][phase - 1], "out_dir": out_dir, "model": model,
        "data": merge(spec["data"], {"classes": list(spec["first" if phase == 1 else "second"])})})
    if phase == 1:
        return merge(config, NO_SEEDS)
    model = config["model"]
    model["init_from"] = extra["init_from"]
    if arm != "finetune":
        model["freeze"] = ["layers.*", "head.*"]  # the host as phase 1 left it; adapters are new
    if arm == "static_adapters":
        model["kwargs"]["adapter_width"] = extra["adapter_width"]
    if not arm.startswith("esper"):
        return merge(config, NO_SEEDS)
    config = merge(merge(config, bench["esper"]), spec["esper"])
    return merge(config, spec.get(arm, {}) if arm != "esper" else {})


def materialise(bench: dict[str, Any]) -> None:
    """Write each task's `npz` file from its `source` data spec where the file is missing: a
    machine without the source's generator (the GPU image has no mnist1d) gets it carried."""
    import numpy as np

    from esper.tolaria.data import build_data

    for task, spec in bench["tasks"].items():
        source = spec.get("source")
        path = Path(spec["data"].get("kwargs", {}).get("path", ""))
        if source is None or path.is_file():
            continue
        data = build_data({k: v for k, v in source.items() if k != "seed"}, seed=source.get("seed", 0))
        arrays = {}
        for name, part in (("", data.train), ("_val", data.val)):
            arrays["x" + name], arrays["y" + name] = (t.numpy() for t in part.tensors)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
        print(f"{task}: wrote {path} ({len(data.train)} train, {len(data.val)} validation)", flush=True)


# --- the workspace --------------------------------------------------------------------------

def esper_cli(args: list[str], workspace: Path, **kw: Any) -> subprocess.Popen:
    env = dict(os.environ, ESPER_WORKSPACE=str(workspace), PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-c", ESPER_CLI, *args], env=env, cwd=ROOT, **kw)


def interfaces(bench: dict[str, Any], device: str) -> list[str]:
    """Every seed interface the Esper arms wrap, from a dry `kasmina.wrap` of each small host."""
    import kasmina
    from esper.tolaria.config import TrainConfig
    from esper.tolaria.data import build_data
    from esper.tolaria.models import build_model

    found: set[str] = set()
    growing = {"esper", *(arm for arm in bench["arms"] if grows(arm) and arm != "random_placement")}
    mappings = [train_config(bench, task, arm, 0, device, "runs")
                for task in bench["tasks"] for arm in sorted(growing)]
    if "continual" in bench:
        mappings += [continual_config(bench, arm, 0, device, "runs", phase=2, init_from="")
                     for arm in bench["continual"]["arms"] if arm.startswith("esper")]
    for mapping in mappings:
        config = TrainConfig.from_mapping(mapping)
        data = build_data(config.data, seed=config.data_seed)
        host = build_model(config.model, data.input_shape, data.out_dim)
        found |= {str(i) for i in kasmina.wrap(host, config.kasmina)[1].interfaces}
    return sorted(found)


def _from_root(path: Path) -> str:
    """`path` relative to the repository (as results record it) where it lies inside."""
    path = path.resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def build_workspace(bench: dict[str, Any], root: Path, device: str, jobs: int) -> dict[str, Any]:
    """Register the config's blueprints, forge them for every interface, bench them (`jobs`
    benches in parallel). Idempotent: what is VALIDATED already is kept."""
    from esper.blueprints import standard_library
    from esper.library import read_ir_files, register
    from esper.urza import Urza
    from esper.workspace import Workspace

    started = time.perf_counter()
    ws = Workspace(root)
    ws.create()
    wanted = bench.get("blueprints")
    files = read_ir_files([ROOT / b for b in wanted or [] if b.endswith(".json")])
    with Urza.open(ws) as urza:
        known = {b.name for b in urza.list_blueprints()}
        irs = [(ir, f"standard library: {ir.name}") for ir in standard_library()
               if (wanted is None or ir.name in wanted) and ir.name not in known]
        irs += [(ir, source) for ir, source in files if ir.name not in known]
        if irs:
            register(urza, irs, origin="library", actor="bench_growth")
    faces = interfaces(bench, device)
    forge_device = "cuda" if device.startswith("cuda") else "cpu"
    forge = esper_cli(["forge", "--once", "--no-idle", "--pipelines", "fast", "--device", forge_device,
                       *[a for face in faces for a in ("--interface", face)]], root,
                      stdout=subprocess.DEVNULL)
    if forge.wait():
        raise SystemExit(f"esper forge failed (exit {forge.returncode})")
    benches = [esper_cli(["bench", "--once", "--device", forge_device, "--worker-id", f"growth-{i}"],
                         root, stdout=subprocess.DEVNULL) for i in range(jobs)]
    for b in benches:
        b.wait()
    with Urza.open(ws) as urza:
        kernels = urza.list_kernels()
        status = defaultdict(int)
        for k in kernels:
            status[k.status.value] += 1
    print(f"workspace {root}: {len(faces)} interface(s) {', '.join(faces)}; kernels "
          f"{dict(status)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"interfaces": faces, "kernels": dict(status), "seconds": time.perf_counter() - started}


# --- one run (in a worker process) ----------------------------------------------------------

def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # two runs on two cores beat one run on two: these models are tiny


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (task, arm, seed) and measure it."""
    import torch

    started = time.perf_counter()
    if job["arm"] == "gromo":
        return _run_gromo(job, started)
    import kasmina
    from esper.tolaria.config import TrainConfig
    from esper.tolaria.run import run_training
    from esper.tolaria.trainer import TrainingDivergedError
    from esper.workspace import Workspace
    from kasmina.lifecycle import BLENDING

    config = TrainConfig.from_mapping(job["config"])
    workspace = Workspace(Path(job["workspace"])) if grows(job["arm"]) else None
    run_id = f"{job['task']}-{job['arm']}-s{job['seed']}-{os.getpid()}-{time.time_ns() % 10**6}"
    try:
        result = run_training(config, workspace=workspace, run_id=run_id)
    except TrainingDivergedError as e:  # recorded, not fatal: the sweep's other runs stand
        return {**_key(job), "skipped": f"diverged: {e}", "failed": True}
    summary = result.summary
    curve = [r.get("validation_accuracy") if job["task_kind"] == "classification"
             else r.get("validation_loss") for r in result.history.epochs]
    # Layers a graft changes: any seed blending into them at the end (FOSSILIZED included).
    grafted = sorted(layer.layer_name for layer in kasmina.layers(result.model)
                     if any(stage in BLENDING for stage in layer.stages))
    reps = _representations(result.model, config, job)
    if "class_sets" in job:  # the continual split: accuracy on each phase's classes
        extra = {"class_accuracy": {name: _class_accuracy(result.model, config, classes)
                                    for name, classes in job["class_sets"].items()},
                 "run_dir": str(result.run_dir)}
    else:
        extra = {}
    return {
        **extra,
        **_key(job), "metric": curve[-1], "best": _best(curve, job["task_kind"]), "curve": curve,
        "parameters": summary["parameters"], "germinations": summary["germinations"],
        "outcomes": summary["outcomes"], "fossilized": summary["fossilized"],
        "rollbacks": summary["rollbacks"], "grafted_layers": grafted,
        "representations": {k: v.tolist() for k, v in reps.items()},
        "wall_seconds": time.perf_counter() - started, "torch": torch.__version__,
    }


def _key(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job[k] for k in ("task", "arm", "seed")}


def _best(curve: list[float], kind: str) -> float:
    return max(curve) if kind == "classification" else min(curve)


def _class_accuracy(model: Any, config: Any, classes: list[int]) -> dict[str, float]:
    """Validation accuracy on the samples of `classes` alone: `all`, the prediction over every
    class (class-incremental), and `within`, over `classes` only (the task's own classes, as a
    task-incremental protocol reads them)."""
    import torch

    from esper.tolaria.data import build_data

    data = build_data(config.data.model_copy(update={"classes": list(classes)}), seed=config.data_seed)
    x, y = data.val.tensors
    model.eval()
    with torch.no_grad():
        logits = model(x.to(next(model.parameters()).device)).cpu()
    own = torch.tensor(classes)
    return {"all": float((logits.argmax(-1) == y).double().mean()),
            "within": float((own[logits[:, own].argmax(-1)] == y).double().mean())}


def _representations(model: Any, config: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Each hidden layer's output (before its activation) on up to 512 validation inputs."""
    import torch

    import kasmina
    from esper.tolaria.data import build_data

    data = build_data(config.data, seed=config.data_seed)
    inputs = torch.stack([data.val[i][0] for i in range(min(512, len(data.val)))])
    by_path = {layer.layer_name: layer for layer in kasmina.layers(model)}
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for i in range(len(job["config"]["model"]["kwargs"]["widths"])):
        path = f"layers.{i}"
        module = by_path.get(path) or model.get_submodule(path)
        hooks.append(module.register_forward_hook(
            lambda _m, _i, out, path=path: outputs.__setitem__(path, out.detach().float().cpu())))
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        model(inputs.to(device))
    for hook in hooks:
        hook.remove()
    return outputs


def _run_gromo(job: dict[str, Any], started: float) -> dict[str, Any]:
    import torch

    from esper.tolaria.data import build_data

    spec = importlib.util.spec_from_file_location("growth_gromo", ROOT / "scripts/growth_gromo.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        return {**_key(job), "skipped": f"gromo is not installed ({e})"}
    c = job["config"]
    data = build_data(c["data"], seed=c["seed"])
    tensors = {name: part.tensors for name, part in (("train", data.train), ("val", data.val))}
    g = job["gromo"]
    try:
        out = module.run_gromo(
            train=tensors["train"], val=tensors["val"], task=data.task,
            in_features=math.prod(data.input_shape), out_features=data.out_dim,
            start_widths=list(c["model"]["kwargs"]["widths"]), epochs=c["epochs"],
            batch_size=c["data"]["batch_size"], lr=float(c["optimizer"]["lr"]),
            weight_decay=float(c["optimizer"]["weight_decay"]), seed=c["seed"],
            growth_every=g["growth_every"], max_growth_steps=g["max_growth_steps"],
            neurons_per_growth=g["neurons_per_growth"],
            device="cuda" if str(c["device"]).startswith("cuda") else "cpu")
    except NotImplementedError as e:
        return {**_key(job), "skipped": str(e)}
    curve = [h["val_metric"] for h in out["history"]]
    return {**_key(job), "metric": out["metric"], "best": _best(curve, data.task), "curve": curve,
            "parameters": out["parameters"], "germinations": out["growth_steps"],
            "outcomes": {}, "fossilized": out["growth_steps"], "rollbacks": 0,
            "grafted_layers": [], "widths": out["widths"], "representations": {},
            "wall_seconds": time.perf_counter() - started, "torch": torch.__version__}


# --- the sweep ------------------------------------------------------------------------------

def task_kinds(bench: dict[str, Any]) -> dict[str, str]:
    kinds = {}
    for task, spec in bench["tasks"].items():
        name = spec["data"]["name"]
        kinds[task] = "regression" if name == "teacher_student" else "classification"
    return kinds


def adapter_width(widths: list[int], budget: float, in_features: int) -> int:
    """The adapter width whose adapters on every hidden layer of an MLP with hidden `widths`
    add about `budget` parameters."""
    pairs = list(itertools.pairwise([in_features, *widths]))
    per_unit = sum(a + 1 + b for a, b in pairs)  # in*r + r + r*out per layer, plus out's bias
    return max(1, round((budget - sum(b for _, b in pairs)) / per_unit))


def matched_adapter_width(bench: dict[str, Any], task: str,
                          done: list[dict[str, Any]]) -> int | None:
    """The `static_adapters` width for `task` that adds the mean parameters the config's
    `adapters_match` arm (default `esper`) added over `static_small` in `done`; None without
    runs of both."""
    matched = [r for r in done if r["task"] == task and r["arm"] == bench.get("adapters_match", "esper")]
    small = [r for r in done if r["task"] == task and r["arm"] == "static_small"]
    if not matched or not small:
        return None
    budget = (statistics.mean(r["parameters"] for r in matched)
              - statistics.mean(r["parameters"] for r in small))
    spec = bench["tasks"][task]
    return adapter_width(spec["small"], budget, _in_features(spec["data"]))


def sweep(bench: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    kinds = task_kinds(bench)
    arms = bench["arms"]
    out_dir = str(Path(args.work) / "runs")
    base = {"workspace": str(Path(args.workspace).absolute()), "gromo": bench.get("gromo", {})}

    def job(task: str, arm: str, seed: int, **extra: Any) -> dict[str, Any]:
        return {**base, "task": task, "arm": arm, "seed": seed, "task_kind": kinds[task],
                "config": train_config(bench, task, arm, seed, args.device, out_dir, **extra)}

    results: list[dict[str, Any]] = []
    ctx = get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker) as pool:
        first = [job(t, a, s) for t in bench["tasks"] for a in arms if a not in PHASE_TWO
                 for s in bench["seeds"]]
        results += _collect(pool, first)
        second = []
        for task in bench["tasks"]:
            done = [r for r in results if r["task"] == task and "skipped" not in r]
            esper = [r for r in done if r["arm"] == "esper"]
            width = matched_adapter_width(bench, task, done) if "static_adapters" in arms else None
            for seed in bench["seeds"]:
                if "random_placement" in arms:
                    made = next((r["germinations"] for r in esper if r["seed"] == seed), 0)
                    second.append(job(task, "random_placement", seed, max_germinations=made))
                if width is not None:
                    second.append(job(task, "static_adapters", seed, adapter_width=width))
                if "gromo" in arms:
                    second.append(job(task, "gromo", seed))
        results += _collect(pool, second)
        if "continual" in bench:
            results += continual_sweep(bench, args, pool, {**base, "task_kind": "classification"})
    return results


def continual_sweep(bench: dict[str, Any], args: argparse.Namespace, pool: ProcessPoolExecutor,
                    base: dict[str, Any]) -> list[dict[str, Any]]:
    """Phase 1 per seed, then `finetune` and `esper` from its host, then `static_adapters` at
    esper's mean parameter budget."""
    spec = bench["continual"]
    out_dir = str(Path(args.work) / "runs")
    sets = {"first": list(spec["first"]), "second": list(spec["second"])}

    def job(arm: str, seed: int, phase: int, **extra: Any) -> dict[str, Any]:
        return {**base, "task": "continual", "arm": arm if phase == 2 else "phase_1", "seed": seed,
                "class_sets": sets,
                "config": continual_config(bench, arm, seed, args.device, out_dir, phase=phase, **extra)}

    hosts = _collect(pool, [job("host", seed, 1) for seed in bench["seeds"]])
    start = {r["seed"]: r["run_dir"] for r in hosts if "skipped" not in r}
    arms = [a for a in spec["arms"] if a != "static_adapters"]
    grown = _collect(pool, [job(arm, seed, 2, init_from=start[seed]) for seed in start for arm in arms])
    done = hosts + grown
    esper = [r for r in grown if r["arm"] == "esper" and "skipped" not in r]
    if "static_adapters" in spec["arms"] and esper and hosts:
        budget = statistics.mean(r["parameters"] for r in esper) - statistics.mean(r["parameters"] for r in hosts)
        width = adapter_width(spec["widths"], budget, _in_features(spec["data"]))
        done += _collect(pool, [job("static_adapters", seed, 2, init_from=start[seed], adapter_width=width)
                                for seed in start])
    return done


def _in_features(data_spec: dict[str, Any]) -> int:
    return _host_dims(json.dumps(data_spec, sort_keys=True))[0]


def _collect(pool: ProcessPoolExecutor, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for done, result in enumerate(pool.map(run_job, jobs), 1):
        shown = "skipped: " + result["skipped"] if "skipped" in result else (
            f"{result['metric']:.4f}  params {result['parameters']}  germinations "
            f"{result['germinations']} {result['outcomes']}  {result['wall_seconds']:.1f} s")
        print(f"[{done}/{len(jobs)}] {result['task']:<16} {result['arm']:<21} seed {result['seed']}  "
              f"{shown}", flush=True)
        out.append(result)
    return out


# --- analysis -------------------------------------------------------------------------------

def drift(results: list[dict[str, Any]]) -> None:
    """Fill `drift` (mean 1 - cos per unmodified layer, against static_small) in place."""
    import torch

    small = {(r["task"], r["seed"]): r for r in results if r["arm"] == "static_small"}
    for r in results:
        ref = small.get((r["task"], r["seed"]))
        if not grows(r["arm"]) or ref is None or "skipped" in r:
            continue
        modified = set(r["grafted_layers"]) | {  # a graft on spans.i feeds layers.i+1
            f"layers.{int(path.split('.')[1]) + 1}" for path in r["grafted_layers"] if path.startswith("spans.")}
        per_layer = {}
        for path, rep in r["representations"].items():
            if path in modified or path not in ref["representations"]:
                continue
            a, b = torch.tensor(rep), torch.tensor(ref["representations"][path])
            per_layer[path] = float((1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).mean())
        r["drift"] = per_layer


def summarise(bench: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    kinds = task_kinds(bench)
    table: dict[str, Any] = {}
    for task in bench["tasks"]:
        rows = {}
        runs = defaultdict(list)
        for r in results:
            if r["task"] == task and "skipped" not in r:
                runs[r["arm"]].append(r)
        small = runs.get("static_small", [])
        large = runs.get("static_large", [])
        if not small or not large:
            continue
        m_small = statistics.mean(r["metric"] for r in small)
        m_large = statistics.mean(r["metric"] for r in large)
        p_small = statistics.mean(r["parameters"] for r in small)
        extra_large = statistics.mean(r["parameters"] for r in large) - p_small
        for arm in bench["arms"]:
            got = runs.get(arm, [])
            failed = [r["skipped"] for r in results if r["task"] == task and r["arm"] == arm
                      and r.get("failed")]
            if not got:
                skipped = [r["skipped"] for r in results if r["task"] == task and r["arm"] == arm
                           and "skipped" in r]
                rows[arm] = {"skipped": skipped[0] if skipped else "not run"}
                continue
            metric = [r["metric"] for r in got]
            added = statistics.mean(r["parameters"] for r in got) - p_small
            closed = ((statistics.mean(metric) - m_small) / (m_large - m_small)
                      if m_large != m_small else float("nan"))
            share = added / extra_large if extra_large else float("nan")
            outcomes = defaultdict(int)
            for r in got:
                for k, v in r["outcomes"].items():
                    outcomes[k] += v
            drifts = [d for r in got for d in r.get("drift", {}).values()]
            rows[arm] = {
                "metric_mean": statistics.mean(metric),
                "metric_std": statistics.stdev(metric) if len(metric) > 1 else 0.0,
                "metric_per_seed": metric, "seeds": [r["seed"] for r in got],
                "parameters": statistics.mean(r["parameters"] for r in got),
                "added": added, "added_share_of_large_extra": share, "gap_closed": closed,
                "gap_closed_per_added_share": closed / share if share and share > 0 else None,
                "germinations": sum(r["germinations"] for r in got),
                "outcomes": dict(outcomes), "rollbacks": sum(r["rollbacks"] for r in got),
                "drift_max": max(drifts) if drifts else None,
                "drift_mean": statistics.mean(drifts) if drifts else None,
                "wall_seconds": statistics.mean(r["wall_seconds"] for r in got),
                "failed": failed,
            }
        table[task] = {"kind": kinds[task], "metric": "validation accuracy" if kinds[task] ==
                       "classification" else "validation loss (MSE)", "arms": rows}
    return table


def summarise_continual(bench: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per phase-2 arm: accuracy on the first classes before (the phase-1 host) and after, its
    relative degradation, accuracy on the second classes, germinations and parameters added."""
    if "continual" not in bench:
        return None
    runs = [r for r in results if r["task"] == "continual" and "skipped" not in r]
    hosts = {r["seed"]: r for r in runs if r["arm"] == "phase_1"}
    rows: dict[str, Any] = {}
    for arm in ["phase_1", *bench["continual"]["arms"]]:
        got = [r for r in runs if r["arm"] == arm and r["seed"] in hosts]
        if not got:
            rows[arm] = {"skipped": "not run"}
            continue
        row: dict[str, Any] = {}
        for protocol in ("all", "within"):
            before = [hosts[r["seed"]]["class_accuracy"]["first"][protocol] for r in got]
            after = [r["class_accuracy"]["first"][protocol] for r in got]
            row[protocol] = {
                "first_before": statistics.mean(before), "first_after": statistics.mean(after),
                "first_per_seed": after,
                "degradation": statistics.mean((b - a) / b for b, a in zip(before, after)),
                "second_after": statistics.mean(r["class_accuracy"]["second"][protocol] for r in got),
                "second_per_seed": [r["class_accuracy"]["second"][protocol] for r in got]}
        rows[arm] = {
            **row,
            "germinations": statistics.mean(r["germinations"] for r in got),
            "fossilized": statistics.mean(r["fossilized"] for r in got),
            "outcomes": {k: sum(r["outcomes"].get(k, 0) for r in got)
                         for k in sorted({k for r in got for k in r["outcomes"]})},
            "added": statistics.mean(r["parameters"] - hosts[r["seed"]]["parameters"] for r in got),
            "wall_seconds": statistics.mean(r["wall_seconds"] for r in got),
        }
    return {"first": bench["continual"]["first"], "second": bench["continual"]["second"], "arms": rows}


def goals(table: dict[str, Any], continual: dict[str, Any] | None = None) -> list[str]:
    """The issue's goals, checked on what was measured."""
    lines = []
    for task, t in table.items():
        arms = t["arms"]
        sign = 1 if t["kind"] == "classification" else -1
        for arm in [a for a in arms if a.startswith("esper") and not a.endswith("_random")]:
            e = arms.get(arm, {})
            if "metric_mean" not in e:
                continue
            ok = e["gap_closed"] >= 0.8 and e["added_share_of_large_extra"] <= 0.25
            goal = " (the goal names mnist1d and digits)" if task not in ("mnist1d", "digits") else ""
            lines.append(f"{task}: {arm} closed {fmt(e['gap_closed'], pct=True)} of the gap adding "
                         f"{fmt(e['added_share_of_large_extra'], pct=True)} of the large host's extra "
                         f"parameters (goal >= 80% with <= 25%{goal}): **{'met' if ok else 'missed'}**")
            for other in ("static_adapters", "random_placement", f"{arm}_random"):
                o = arms.get(other, {})
                if "metric_mean" in o:
                    better = sign * (e["metric_mean"] - o["metric_mean"]) > 0
                    lines.append(f"{task}: {arm} {e['metric_mean']:.4f} vs {other} "
                                 f"{o['metric_mean']:.4f}: **{'beats' if better else 'does not beat'}** it")
    drifts = [(task, arm, a["drift_max"]) for task, t in table.items() for arm, a in t["arms"].items()
              if a.get("drift_max") is not None]
    if drifts:
        worst = max(drifts, key=lambda d: d[2])
        lines.append(f"drift in unmodified layers: largest {worst[2]:.3f} ({worst[0]}, {worst[1]}) "
                     f"(goal < 0.05): **{'met' if worst[2] < 0.05 else 'missed'}**")
    for arm, e in (continual or {}).get("arms", {}).items():
        if not arm.startswith("esper") or "within" not in e:
            continue
        w, a = e["within"], e["all"]
        # HLD 2.4.4 counts successful germinations: grafts kept (FOSSILIZED), not attempts.
        ok = e["fossilized"] >= 20 and w["degradation"] < 0.05
        lines.append(f"continual split: {arm} lost {fmt(w['degradation'], pct=True)} of its accuracy "
                     f"on the first classes, read within them ({w['first_before']:.3f} -> "
                     f"{w['first_after']:.3f}; over all classes {fmt(a['degradation'], pct=True)}) "
                     f"after {e['germinations']:.1f} germinations a run, {e['fossilized']:.1f} of them "
                     f"fossilized, learning the second classes to {w['second_after']:.3f} within them "
                     f"(goal < 5% after 20+ successful): **{'met' if ok else 'missed'}**")
    return lines


# --- outputs --------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 3, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.0%}" if pct else f"{value:.{digits}f}"


def markdown(bench: dict[str, Any], table: dict[str, Any], env: dict[str, Any],
             config_path: Path, seconds: float, stem: str, continual: dict[str, Any] | None = None) -> str:
    out = [f"# Growth benchmark results ({config_path.name})", "",
           ("Written by `scripts/bench_growth.py`; raw numbers (every arm, task and seed) in "
           f"`docs/{stem}.json`. What the arms and metrics are: the script's docstring. "
           "The analysis is in `docs/growth.md`."), "",
           (f"Hardware: {env['hardware']}; torch {env['torch']}, Python {env['python']}. Seeds "
           f"{bench['seeds']}; whole sweep {seconds / 60:.1f} min."), "", "## Goals", ""]
    out += [f"- {line}" for line in goals(table, continual)] + [""]
    for task, t in table.items():
        out += [f"## {task}", "", (f"Metric: final {t['metric']} (mean ± std over seeds). "
                "Gap closed: (arm - small) / (large - small). Added share: parameters added over "
                "the small host / the large host's extra parameters."), "",
                ("| arm | metric | params | added | added share | gap closed | germinations "
                "(outcomes) | drift max | wall s |"), "|---|---|---|---|---|---|---|---|---|"]
        for arm, a in t["arms"].items():
            if "skipped" in a:
                out.append(f"| {arm} | n/a: {a['skipped']} | | | | | | | |")
                continue
            outcomes = ", ".join(f"{k.lower()} {v}" for k, v in sorted(a["outcomes"].items()))
            diverged = f"; {len(a['failed'])} run(s) diverged, left out" if a.get("failed") else ""
            out.append(f"| {arm} | {a['metric_mean']:.4f} ± {a['metric_std']:.4f} | "
                       f"{a['parameters']:.0f} | {a['added']:.0f} | "
                       f"{fmt(a['added_share_of_large_extra'], pct=True)} | "
                       f"{fmt(a['gap_closed'], pct=True)} | {a['germinations']}"
                       f"{f' ({outcomes})' if outcomes else ''}{diverged} | {fmt(a['drift_max'])} | "
                       f"{a['wall_seconds']:.1f} |")
        out += ["", f"![{task}]({stem}-{task}.png)", ""]
    if continual:
        spec = bench["continual"]
        out += ["## continual split", "", (
            f"{spec['data']['name']}, host {spec['widths']}: phase 1 trains it on classes "
            f"{continual['first']} for {spec['epochs'][0]} epochs; phase 2 starts each arm from that "
            f"host on classes {continual['second']} for {spec['epochs'][1]} epochs. `finetune` "
            "trains the whole host; the esper arms and `static_adapters` freeze it, so only grafts or "
            "adapters learn. Accuracy is read two ways: over all ten classes (class-incremental: "
            "the model must also tell old from new) and within each phase's own classes "
            "(task-incremental: the task is known). Degradation: the relative loss of accuracy "
            "on the first classes. Means over seeds."), "",
            ("| arm | first classes, within: before -> after (degradation) | over all classes | "
             "second classes, within / over all | germinations a run (outcomes) | added params | "
             "wall s |"), "|---|---|---|---|---|---|---|"]
        for arm, a in continual["arms"].items():
            if "skipped" in a:
                out.append(f"| {arm} | n/a: {a['skipped']} | | | | | |")
                continue
            w, c = a["within"], a["all"]
            outcomes = ", ".join(f"{k.lower()} {v}" for k, v in a["outcomes"].items())
            out.append(f"| {arm} | {w['first_before']:.3f} -> {w['first_after']:.3f} "
                       f"({fmt(w['degradation'], pct=True)}) | {c['first_before']:.3f} -> "
                       f"{c['first_after']:.3f} ({fmt(c['degradation'], pct=True)}) | "
                       f"{w['second_after']:.3f} / {c['second_after']:.3f} | "
                       f"{a['germinations']:.1f}{f' ({outcomes})' if outcomes else ''} | "
                       f"{a['added']:.0f} | {a['wall_seconds']:.1f} |")
        out.append("")
    return "\n".join(out) + "\n"


def plots(bench: dict[str, Any], results: list[dict[str, Any]], table: dict[str, Any],
          out: Path, stem: str) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (rerun with --from-json where it is)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, t in table.items():
        fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.2))
        if len(bench["arms"]) > 10:  # the default cycle repeats its 10 colours
            curves.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for arm in bench["arms"]:
            got = [r["curve"] for r in results if r["task"] == task and r["arm"] == arm
                   and "skipped" not in r]
            if not got:
                continue
            n = min(len(c) for c in got)
            mean = [statistics.mean(c[i] for c in got) for i in range(n)]
            curves.plot(range(1, n + 1), mean, label=arm)
        curves.set_xlabel("epoch")
        curves.set_ylabel(t["metric"])
        curves.set_title(f"{task}: validation curve (mean over seeds)")
        curves.legend(fontsize=8)
        names = [a for a in bench["arms"] if "metric_mean" in t["arms"].get(a, {})]
        bars.bar(range(len(names)), [t["arms"][a]["metric_mean"] for a in names],
                 yerr=[t["arms"][a]["metric_std"] for a in names], capsize=3)
        bars.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        values = [t["arms"][a]["metric_mean"] for a in names]
        span = max(values) - min(values) or 1.0
        bars.set_ylim(min(values) - 0.3 * span, max(values) + 0.3 * span)
        bars.set_title(f"{task}: final {t['metric']}")
        fig.tight_layout()
        path = out / f"{stem}-{task}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def environment(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    hardware = f"{os.cpu_count()} x {cpu}"
    if device.startswith("cuda"):
        hardware = f"{torch.cuda.get_device_name()} ({hardware})"
    return {"hardware": hardware, "torch": torch.__version__, "python": platform.python_version(),
            "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None, help=f"default {FULL.relative_to(ROOT)}")
    parser.add_argument("--quick", action="store_true", help=f"use {QUICK.relative_to(ROOT)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)),
                        help="runs at once (default: the cores, at most 8)")
    parser.add_argument("--workspace", default=str(ROOT / ".bench-growth/workspace"),
                        help="kept between invocations: the forged and benched kernels")
    parser.add_argument("--work", default=str(ROOT / ".bench-growth"), help="run directories")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where results go")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    parser.add_argument("--tasks", nargs="+", help="only these tasks")
    parser.add_argument("--arms", nargs="+", help="only these of the config's arms")
    parser.add_argument("--stem", help="output file names (default growth-results, or "
                        "growth-results-quick with --quick)")
    parser.add_argument("--from-json", type=Path, help="redo the tables and plots of a saved run")
    args = parser.parse_args()
    if args.from_json:
        raw = json.loads(args.from_json.read_text())
        stem = args.stem or args.from_json.stem
        table = summarise(raw["config"], raw["runs"])
        continual = summarise_continual(raw["config"], raw["runs"])
        path = Path(raw["config_file"])
        (args.out / f"{stem}.md").write_text(markdown(raw["config"], table, raw["environment"], path,
                                                     raw["seconds"], stem, continual))
        plots(raw["config"], raw["runs"], table, args.out, stem)
        print((args.out / f"{stem}.md").read_text())
        return
    config_path = args.config or (QUICK if args.quick else FULL)
    bench = parse_yaml(config_path.read_text())  # Esper's config YAML: 3e-3 is a float
    # A `blueprints` entry ending in .json is an IR file, relative to the config file.
    bench["blueprints"] = [_from_root(config_path.parent / b) if b.endswith(".json") else b
                           for b in bench.get("blueprints") or []] or None
    if args.seeds:
        bench["seeds"] = args.seeds
    if args.tasks:
        if "continual" not in args.tasks:
            bench.pop("continual", None)
        bench["tasks"] = {t: bench["tasks"][t] for t in args.tasks if t != "continual"}
    if args.arms:
        unknown = sorted(set(args.arms) - set(bench["arms"]))
        if unknown:
            parser.error(f"--arms: {', '.join(unknown)} not in the config's arms "
                         f"({', '.join(bench['arms'])})")
        bench["arms"] = [arm for arm in bench["arms"] if arm in args.arms]
    started = time.perf_counter()
    env = environment(args.device)
    print(f"growth benchmark: {config_path.relative_to(ROOT) if config_path.is_relative_to(ROOT) else config_path}"
          f", {len(bench['tasks'])} task(s) x {len(bench['arms'])} arm(s) x {len(bench['seeds'])} "
          f"seed(s), {args.jobs} at once on {env['hardware']}", flush=True)
    materialise(bench)
    built = build_workspace(bench, Path(args.workspace).absolute(), args.device, args.jobs)
    results = sweep(bench, args)
    drift(results)
    table = summarise(bench, results)
    continual = summarise_continual(bench, results)
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("growth-results-quick" if args.quick else "growth-results")
    raw = {"config": bench, "config_file": config_path.name, "environment": env,
           "workspace": built, "seconds": seconds, "summary": table, "continual": continual,
           "runs": [{k: v for k, v in r.items() if k != "representations"} for r in results]}
    (args.out / f"{stem}.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(bench, table, env, config_path, seconds, stem, continual))
    written = plots(bench, results, table, args.out, stem)
    print()
    print((args.out / f"{stem}.md").read_text())
    print(f"wrote {args.out / (stem + '.json')}, {args.out / (stem + '.md')} and "
          f"{len(written)} plot(s) in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()

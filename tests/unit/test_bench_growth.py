"""The growth benchmark's configs and analysis (scripts/bench_growth.py): what each arm trains,
and the tables and goal lines built from runs. The sweep itself is the benchmark, not a test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from esper.tolaria.config import TrainConfig, parse_yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_growth():
    spec = importlib.util.spec_from_file_location("bench_growth", ROOT / "scripts/bench_growth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def full():
    return parse_yaml((ROOT / "configs/benchmarks/growth.yaml").read_text())


@pytest.mark.parametrize("name", ["growth.yaml", "growth-quick.yaml", "growth-gpu.yaml",
                                  "growth-wide.yaml"])
def test_every_arm_of_every_config_is_a_valid_train_config(bench_growth, name):
    bench = parse_yaml((ROOT / "configs/benchmarks" / name).read_text())
    for task in bench["tasks"]:
        for arm in bench["arms"]:
            if arm == "gromo":
                continue
            extra = {"adapter_width": 3, "max_germinations": 2}
            config = TrainConfig.from_mapping(bench_growth.train_config(bench, task, arm, 0, "cpu", "runs", **extra))
            if not bench_growth.grows(arm):  # the bare host: kasmina wraps nothing
                assert config.kasmina.targets == [] and not config.kasmina.blocks


def test_arms_differ_only_where_they_should(bench_growth, full):
    def config(arm, **extra):
        return TrainConfig.from_mapping(bench_growth.train_config(full, "mnist1d", arm, 1, "cpu", "runs", **extra))

    small, large, esper = config("static_small"), config("static_large"), config("esper")
    assert small.model.kwargs["widths"] == [16, 16] and large.model.kwargs["widths"] == [256, 256]
    assert (small.seed, small.data, small.optimizer, small.epochs) == (esper.seed, esper.data, esper.optimizer, esper.epochs)
    assert esper.kasmina.train_fossils and not config("esper_frozen_fossils").kasmina.train_fossils
    assert config("esper_last_layer").kasmina.include == ["layers.1"]
    assert config("esper_gradient_match").kasmina.training.objective == "gradient_match"
    random = config("random_placement", max_germinations=5)
    assert (random.tamiyo.location.strategy, random.tamiyo.max_germinations) == ("random", 5)
    assert config("static_adapters", adapter_width=7).model.kwargs["adapter_width"] == 7
    assert random.tamiyo.location.random_seed == 1  # drawn from the run's seed
    # The placement pair: the same seeds and grafts, chosen by the ranking or at random.
    chosen, drawn = config("esper_placement"), config("esper_placement_random")
    assert chosen.kasmina == drawn.kasmina and chosen.kasmina.seeds_per_layer == 4
    assert chosen.tamiyo.max_germinations == drawn.tamiyo.max_germinations == 2
    assert chosen.tamiyo.location.strategy == "bottleneck"
    assert (drawn.tamiyo.location.strategy, drawn.tamiyo.location.random_seed) == ("random", 1)
    assert chosen.tamiyo.model_copy(update={"location": drawn.tamiyo.location}) == drawn.tamiyo
    spread = config("esper_placement_spread")
    assert spread.tamiyo.location.spread and not chosen.tamiyo.location.spread
    assert spread.kasmina == chosen.kasmina


def test_continual_phases(bench_growth, full):
    def config(arm, phase):
        return TrainConfig.from_mapping(bench_growth.continual_config(
            full, arm, 0, "cpu", "runs", phase=phase, init_from="runs/p1", adapter_width=4))

    first = config("host", 1)
    assert first.data.classes == [0, 1, 2, 3, 4] and first.model.init_from is None
    assert first.kasmina.targets == []  # phase 1 trains the bare host
    tune, esper, adapters = config("finetune", 2), config("esper", 2), config("static_adapters", 2)
    for c in (tune, esper, adapters):
        assert c.data.classes == [5, 6, 7, 8, 9] and c.model.init_from == "runs/p1"
    assert tune.model.freeze == [] and tune.kasmina.targets == adapters.kasmina.targets == []
    assert esper.model.freeze == adapters.model.freeze == ["layers.*", "head.*"]
    assert esper.kasmina.include == ["layers.*", "head"] and esper.kasmina.chunk_width == 2
    assert adapters.model.kwargs["adapter_width"] == 4
    head = config("esper_head", 2)  # esper with the split's esper_head section over it
    assert head.model.freeze == esper.model.freeze and head.kasmina.include == ["head"]
    assert head.kasmina.chunk_width == 1 and head.tamiyo == esper.tamiyo
    assert head.kasmina.training == esper.kasmina.training
    guard = config("esper_guard", 2)  # the first classes guarded, fossils frozen
    assert guard.guard.data.classes == [0, 1, 2, 3, 4] and guard.guard.data.name == esper.data.name
    assert guard.tamiyo.gates.guard_max_degradation == 0.04 and not guard.kasmina.train_fossils
    assert esper.guard is None and esper.kasmina.train_fossils


def _run(task, arm, seed, metric, parameters, **extra):
    return {"task": task, "arm": arm, "seed": seed, "metric": metric, "parameters": parameters,
            "germinations": extra.pop("germinations", 0), "outcomes": extra.pop("outcomes", {}),
            "fossilized": extra.pop("fossilized", 0), "rollbacks": 0, "wall_seconds": 1.0, "curve": [metric], **extra}


def test_summary_gap_closed_goals_and_drift(bench_growth):
    bench = {"seeds": [0, 1], "arms": ["static_small", "static_large", "esper", "static_adapters"],
             "tasks": {"digits": {"data": {"name": "digits"}}}}
    runs = [_run("digits", "static_small", s, 0.90, 1000) for s in (0, 1)]
    runs += [_run("digits", "static_large", s, 1.00, 11000) for s in (0, 1)]
    runs += [_run("digits", "esper", 0, 0.98, 3000, germinations=3, outcomes={"FOSSILIZED": 3},
                  drift={"layers.0": 0.01}),
             _run("digits", "esper", 1, 0.96, 3000, outcomes={"CULLED": 1}, drift={"layers.0": 0.07})]
    runs += [_run("digits", "static_adapters", s, 0.99, 3000) for s in (0, 1)]
    table = bench_growth.summarise(bench, runs)
    esper = table["digits"]["arms"]["esper"]
    assert esper["gap_closed"] == pytest.approx(0.7)
    assert esper["added_share_of_large_extra"] == pytest.approx(0.2)
    assert esper["outcomes"] == {"FOSSILIZED": 3, "CULLED": 1} and esper["drift_max"] == 0.07
    lines = bench_growth.goals(table)
    assert not any("esper_placement" in line for line in lines)  # arms not run: no line
    assert any("esper closed 70%" in line and "**missed**" in line for line in lines)
    assert any("does not beat" in line and "static_adapters" in line for line in lines)
    assert any("largest 0.070" in line and "**missed**" in line for line in lines)


def test_the_workspace_forges_for_every_growing_arm_s_seed_interfaces(bench_growth, full):
    bench = {**full, "tasks": {"digits": full["tasks"]["digits"]}}
    bench.pop("continual")
    # digits [8, 8] from 64 inputs: one seed a layer (8 wide), esper_placement's 4 (2 wide), and
    # the spans of esper_spans / esper_widen: 64 inputs -> layers.1 (8), 8 -> the head (10).
    assert bench_growth.interfaces(bench, "cpu") == ["linear:64:2", "linear:64:8", "linear:8:10",
                                                     "linear:8:2", "linear:8:8"]


def test_drift_skips_the_layers_a_graft_changes_a_span_graft_the_layer_it_feeds(bench_growth):
    reps = {"layers.0": [[1.0, 0.0]], "layers.1": [[1.0, 0.0]], "layers.2": [[1.0, 0.0]]}
    turned = {"layers.0": [[0.0, 1.0]], "layers.1": [[0.0, 1.0]], "layers.2": [[1.0, 1.0]]}
    runs = [_run("digits", "static_small", 0, 0.9, 1000, representations=reps, grafted_layers=[]),
            _run("digits", "esper_spans", 0, 0.9, 2000, representations=turned, grafted_layers=["spans.0"]),
            _run("digits", "esper", 0, 0.9, 2000, representations=turned, grafted_layers=["layers.0"])]
    bench_growth.drift(runs)
    assert runs[1]["drift"] == {"layers.0": 1.0, "layers.2": pytest.approx(1 - 2 ** -0.5)}
    assert runs[2]["drift"] == {"layers.1": 1.0, "layers.2": pytest.approx(1 - 2 ** -0.5)}


def test_an_esper_arm_is_compared_with_its_random_control(bench_growth):
    bench = {"seeds": [0], "arms": ["static_small", "static_large", "esper_placement",
                                    "esper_placement_random"],
             "tasks": {"digits": {"data": {"name": "digits"}}}}
    runs = [_run("digits", "static_small", 0, 0.90, 1000), _run("digits", "static_large", 0, 1.00, 11000),
            _run("digits", "esper_placement", 0, 0.95, 2000, germinations=2),
            _run("digits", "esper_placement_random", 0, 0.93, 2000, germinations=2)]
    lines = bench_growth.goals(bench_growth.summarise(bench, runs))
    assert "digits: esper_placement 0.9500 vs esper_placement_random 0.9300: **beats** it" in lines
    assert not any(line.startswith("digits: esper_placement_random") for line in lines)


def test_continual_summary_reads_both_protocols(bench_growth):
    bench = {"seeds": [0], "continual": {"arms": ["finetune", "esper"], "first": [0, 1], "second": [2, 3]}}

    def acc(first_all, first_within, second):
        return {"first": {"all": first_all, "within": first_within},
                "second": {"all": second, "within": second}}

    runs = [_run("continual", "phase_1", 0, 0.8, 100, class_accuracy=acc(0.8, 0.8, 0.0)),
            _run("continual", "finetune", 0, 0.7, 100, class_accuracy=acc(0.0, 0.4, 0.7)),
            _run("continual", "esper", 0, 0.7, 400, germinations=30, fossilized=21,
                 class_accuracy=acc(0.0, 0.784, 0.6))]
    summary = bench_growth.summarise_continual(bench, runs)
    esper = summary["arms"]["esper"]
    assert esper["within"]["degradation"] == pytest.approx(0.02)
    assert esper["all"]["degradation"] == pytest.approx(1.0) and esper["added"] == 300
    (line,) = bench_growth.goals({}, summary)
    assert "lost 2% of its accuracy" in line and "30.0 germinations a run, 21.0 of them" in line
    assert "**met**" in line
    runs[-1]["fossilized"] = 19  # 30 germinations, but under 20 of them successful
    (line,) = bench_growth.goals({}, bench_growth.summarise_continual(bench, runs))
    assert "**missed**" in line
    text = bench_growth.markdown(bench | {"continual": {**bench["continual"], "data": {"name": "x"},
                                                        "widths": [4], "epochs": [1, 2]}},
                                 {}, {"hardware": "h", "torch": "t", "python": "p"}, Path("c.yaml"), 60, "s", summary)
    assert "| esper | 0.800 -> 0.784 (2%) | 0.800 -> 0.000 (100%) | 0.600 / 0.600 | 30.0 |" in text


def test_adapter_width_meets_the_budget(bench_growth):
    # [16, 16] on 40 inputs: width r adds r * (40 + 1 + 16) + 16 + r * (16 + 1 + 16) + 16.
    width = bench_growth.adapter_width([16, 16], budget=16_952, in_features=40)
    assert width == 188 and abs(width * 90 + 32 - 16_952) < 90
    assert bench_growth.adapter_width([8], budget=0, in_features=2) == 1


def test_the_ceiling_s_static_host_is_the_widest_that_fits(full):
    from esper.tolaria.data import build_data

    spec = importlib.util.spec_from_file_location("growth_adapter_ceiling",
                                                  ROOT / "scripts/growth_adapter_ceiling.py")
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)  # it puts scripts/ on the path for bench_growth itself

    data = build_data(full["tasks"]["digits"]["data"], seed=0)
    # [w, w] on 64 inputs, 10 classes: 65w + (w + 1)w + 10(w + 1) = w^2 + 76w + 10 parameters.
    width = ceiling._static_width(full, "digits", 0, "runs", data, budget=7_042)
    assert width == 54 and 54 ** 2 + 76 * 54 + 10 <= 7_042 < 55 ** 2 + 76 * 55 + 10


def test_a_budget_share_is_tamiyos_growth_budget_for_each_task(bench_growth, full):
    """`budget_share` is the bench's key, not a TrainConfig one: it becomes
    tamiyo.max_added_parameters, that share of the task's large-minus-small host parameters."""
    bench = {**full, "esper_budget": {"budget_share": 0.25}}
    mnist1d = TrainConfig.from_mapping(bench_growth.train_config(bench, "mnist1d", "esper_budget",
                                                                 0, "cpu", "runs"))
    # [16, 16] has 1098 parameters on MNIST-1D (40 inputs, 10 classes), [256, 256] 78858
    assert mnist1d.tamiyo.max_added_parameters == (78858 - 1098) // 4
    digits = TrainConfig.from_mapping(bench_growth.train_config(bench, "digits", "esper_budget",
                                                                0, "cpu", "runs"))
    small = 64 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10
    large = 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert digits.tamiyo.max_added_parameters == (large - small) // 4
    assert TrainConfig.from_mapping(bench_growth.train_config(
        full, "mnist1d", "esper", 0, "cpu", "runs")).tamiyo.max_added_parameters is None


def test_adapters_are_sized_to_the_matched_arm(bench_growth, full):
    """static_adapters add what `esper` added, or what the config's `adapters_match` arm did."""
    def run(arm, parameters, task="mnist1d"):
        return {"task": task, "arm": arm, "parameters": parameters}

    done = [run("static_small", 1098), run("esper", 1098 + 3000), run("esper", 1098 + 5000),
            run("esper_widen_budget", 1098 + 15000), run("static_small", 682, "digits")]
    spec = full["tasks"]["mnist1d"]
    by_esper = bench_growth.matched_adapter_width(full, "mnist1d", done)
    assert by_esper == bench_growth.adapter_width(spec["small"], 4000, 40)
    matched = {**full, "adapters_match": "esper_widen_budget"}
    assert bench_growth.matched_adapter_width(matched, "mnist1d", done) == \
        bench_growth.adapter_width(spec["small"], 15000, 40) > by_esper
    assert bench_growth.matched_adapter_width(full, "digits", done) is None  # no esper run there

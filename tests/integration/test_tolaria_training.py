"""`run_training` end to end on tiny data, with a real workspace: real forge artifacts, VALIDATED
by bench-signed reports, loaded through the verifying loader; real SQLite Urza; real torch.

A seed grows through the whole lifecycle to FOSSILIZED (or is CULLED at its gate); the same
config and seed give the same lineage and bit-identical weights; an interrupted run resumed from
its checkpoint ends with the same weights as an uninterrupted one; an injected divergence rolls
the run back bit-exactly; a tampered kernel is refused and the run goes on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tolaria_helpers import (
    INTERFACE,
    forged_workspace,
    same_state,
    short_dir,
    tiny_config,
)

import esper
import kasmina
from esper.contracts import GuardReading
from esper.contracts import SeedLifecycle as S
from esper.errors import BadInputError
from esper.tolaria.checkpoint import CheckpointStore
from esper.tolaria.run import run_training
from esper.urza import Urza
from kasmina.lifecycle import BLENDING


@pytest.fixture(scope="module")
def forged():
    root = short_dir("tolaria-")
    ws, kernels = forged_workspace(root)
    yield ws, kernels["mlp_gelu_w8"]
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(forged):
    """One uninterrupted run of the tiny config: what the other runs are compared with."""
    ws, _ = forged
    return run_training(tiny_config(), workspace=ws)


def _weights(result):
    return load_file(result.run_dir / "model.safetensors")


def _lineage_core(result):
    """The lineage without what names the run (its id, report ids, its own audit rows)."""
    keep = ("seed_id", "kernel_artifact_id", "blueprint_id", "germinated_epoch", "fossilized_epoch",
            "pre_metric", "post_metric", "parameters", "manifest_sha256")
    return [{k: a.get(k) for k in keep} for a in result.history.lineage["adaptations"]]


def test_a_seed_grows_to_fossilized_and_its_lineage_is_recorded(forged, reference):
    ws, kernel = forged
    result = reference
    assert result.status == "completed" and result.summary["fossilized"] == 1
    stages = [e["stages_after"] for e in result.history.epochs]
    for stage in (S.GERMINATED, S.LOADING, S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING,
                  S.FINE_TUNING, S.FOSSILIZED):
        assert any(stage.value in s for s in stages), f"{stage.value} never seen: {stages}"

    (adaptation,) = result.history.lineage["adaptations"]
    assert adaptation["kernel_artifact_id"] == kernel and adaptation["interface"] == INTERFACE
    assert adaptation["germinated_epoch"] < adaptation["fossilized_epoch"]
    actions = {row["action"] for row in adaptation["audit"]}
    assert {"kernel.added", "kernel.validated", "field_report.recorded"} <= actions
    assert all(len(row["row_hash"]) == 64 for row in adaptation["audit"])
    assert json.loads((result.run_dir / "lineage.json").read_text()) == result.history.lineage

    with Urza.open(ws) as urza:
        assert urza.get_run(result.run_id)
        assert INTERFACE in {str(r.interface) for r in urza.requested_interfaces(target="cpu")}
        decisions = urza.list_decisions(run_id=result.run_id)
        (germinate,) = [d for d in decisions if d.action == "germinate"]
        assert germinate.kernel_artifact_id == kernel and "Plateau" in germinate.explanation
        (report,) = urza.list_field_reports(run_id=result.run_id)
        assert report.outcome is S.FOSSILIZED and report.report_id == adaptation["field_report_id"]
        assert urza.verify_audit_chain().ok

    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 13))
    assert all(len(json.loads(line)["step_ms"]) == 7 for line in lines)
    # The exported model rebuilds without the workspace and computes the same function.
    loaded = esper.load_model(result.run_dir)
    x = torch.randn(9, 2)
    assert torch.equal(loaded(x), result.model.eval()(x))
    assert kasmina.layers(loaded)[0].stages == kasmina.layers(result.model)[0].stages


def test_a_graft_on_a_span_widens_the_layer_and_the_export_keeps_it():
    """A seed on `spans.1` (the input of layers.1 -> the head's pre-activation): germinated,
    grafted and kept like any seed, it changes the model's function, and the exported model
    (rebuilt from the config, with its spans) computes the same."""
    root = short_dir("tolaria-span-")
    try:
        ws, kernels = forged_workspace(root, interface="linear:32:2")
        config = tiny_config(**{"model.kwargs": {"widths": [32, 32], "spans": True},
                                "kasmina.targets": [], "kasmina.include": [], "kasmina.seeds_per_layer": 1,
                                "kasmina.blocks": {"spans.1": {"kind": "linear"}}})
        result = run_training(config, workspace=ws)
        (layer,) = kasmina.layers(result.model)
        assert layer.layer_name == "spans.1" and layer.stages == [S.FOSSILIZED]
        assert layer.kernel_of(0) == kernels["mlp_gelu_w8"]
        x = torch.randn(9, 2)
        model = result.model.eval()
        with kasmina.seeds_disabled(model, ["0:0"]):
            host = model(x)
        assert not torch.equal(model(x), host)  # the new units feed the head
        loaded = esper.load_model(result.run_dir)
        assert torch.equal(loaded(x), model(x))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_graft_that_misses_its_gate_is_culled(forged):
    ws, _ = forged
    config = tiny_config(**{"tamiyo.gates.keep_min_improvement": 100.0,
                            "tamiyo.gates.max_evaluation_epochs": 1})
    result = run_training(config, workspace=ws)
    assert result.status == "completed"
    assert result.history.lineage["adaptations"] == []
    (outcome,) = result.history.lineage["other_outcomes"]
    assert outcome["outcome"] == "CULLED" and "EVALUATING" in outcome["reason"]
    assert result.summary["parameters"] == result.summary["host_parameters"]
    with Urza.open(ws) as urza:
        (report,) = urza.list_field_reports(run_id=result.run_id)
        assert report.outcome is S.CULLED


def test_the_same_config_and_seed_give_the_same_lineage_and_weights(forged, reference):
    ws, _ = forged
    again = run_training(tiny_config(), workspace=ws)
    assert again.run_id != reference.run_id
    assert _lineage_core(again) == _lineage_core(reference) and _lineage_core(again)
    assert same_state(_weights(again), _weights(reference)) == []


def test_an_interrupted_run_resumes_to_the_same_weights(forged, reference):
    ws, _ = forged

    def interrupt(event):
        if event.kind == "step" and event.epoch == 7 and event.step == 3:
            raise KeyboardInterrupt  # mid-epoch, mid-graft: the process dies here

    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(), workspace=ws, run_id="interrupted", progress=interrupt)
    run_dir = ws.root / "runs" / "interrupted"
    assert not (run_dir / "model.safetensors").exists()
    assert CheckpointStore(run_dir / "checkpoints").latest().epoch == 6
    resumed = run_training(None, workspace=ws, resume="interrupted")
    assert resumed.status == "completed" and resumed.summary["epochs"] == 12
    assert _lineage_core(resumed) == _lineage_core(reference)
    assert same_state(_weights(resumed), _weights(reference)) == []
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 13))


def test_a_run_resumes_after_a_graft_has_finished(forged, reference):
    """A checkpoint that holds a finished adaptation's field report (its outcome a lifecycle
    stage, stored as JSON text) loads in a new process, and the run ends as the uninterrupted
    one."""
    ws, _ = forged
    finished = min(r.epoch for r in reference.history.field_reports)
    assert finished < 11  # the tiny config finishes a graft with epochs to spare

    def interrupt(event):
        if event.kind == "step" and event.epoch == finished + 2 and event.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(), workspace=ws, run_id="after-graft", progress=interrupt)
    resumed = run_training(None, workspace=ws, resume="after-graft")
    assert resumed.status == "completed"
    assert [r.outcome for r in resumed.history.field_reports] == \
        [r.outcome for r in reference.history.field_reports]
    assert _lineage_core(resumed) == _lineage_core(reference)
    assert same_state(_weights(resumed), _weights(reference)) == []


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(forged, reference):
    """Killed after its config was written but before the epoch-0 checkpoint: --resume starts
    it from epoch 0 (and ends as the uninterrupted run); a folder without even a config takes
    a new run under the same id."""
    ws, _ = forged

    def interrupt(event):
        if event.kind == "step" and event.epoch == 1 and event.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(), workspace=ws, run_id="early", progress=interrupt)
    run_dir = ws.root / "runs" / "early"
    shutil.rmtree(run_dir / "checkpoints")  # as if killed before its first checkpoint
    resumed = run_training(None, workspace=ws, resume="early")
    assert resumed.status == "completed"
    assert any("before its first checkpoint" in n for n in resumed.history.notices)
    assert same_state(_weights(resumed), _weights(reference)) == []

    (ws.root / "runs" / "bare").mkdir()
    (ws.root / "runs" / "bare" / "stray.txt").write_text("left by a killed start\n")
    assert run_training(tiny_config(), workspace=ws, run_id="bare").status == "completed"
    with pytest.raises(BadInputError, match="already exists"):
        run_training(tiny_config(), workspace=ws, run_id="bare")


def test_a_run_training_in_another_process_is_not_trained_twice(forged):
    """The run directory's lock: while another process holds it, a second run under the same
    id is refused before it writes anything; once that process is gone, the id is free."""
    ws, _ = forged
    run_dir = ws.root / "runs" / "held"
    run_dir.mkdir(parents=True)
    hold = ("import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
            "lock.acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BadInputError, match="in use"):
            run_training(tiny_config(), workspace=ws, run_id="held")
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert run_training(tiny_config(), workspace=ws, run_id="held").status == "completed"


def test_a_divergence_before_any_graft_rolls_back_to_the_uninterrupted_weights(forged, reference):
    """A NaN loss at epoch 2: Tamiyo asks for a rollback, Tolaria restores epoch 1's checkpoint
    (model, optimizer, lr, every RNG, Kasmina, Tamiyo) and replays epoch 2. Restored bit-exactly,
    the run then ends with exactly the weights of the run that never diverged."""
    ws, _ = forged
    result = run_training(tiny_config(**{"faults.nan_loss_epochs": [2]}), workspace=ws)
    assert result.summary["rollbacks"] == 1 and result.history.rollbacks[0]["seed_id"] is None
    assert "non-finite" in result.history.rollbacks[0]["reason"]
    assert same_state(_weights(result), _weights(reference)) == []
    assert _lineage_core(result) == _lineage_core(reference)
    with Urza.open(ws) as urza:
        rollbacks = [d for d in urza.list_decisions(run_id=result.run_id) if d.action == "rollback"]
        assert rollbacks and "Emergency rollback required" in rollbacks[0].explanation


def test_a_divergence_during_a_graft_quarantines_the_seed(forged, reference):
    ws, kernel = forged
    epoch = next(e["epoch"] for e in reference.history.epochs
                 if S.GRAFTING.value in e["stages_during"])
    seen = {}

    def on_rollback(event):
        if event.kind == "rollback":
            store = CheckpointStore(ws.root / "runs" / "graft-diverges" / "checkpoints")
            restored, written = store.list()[-2:]  # the one restored, the one written after it
            seen["restored"], seen["written"] = restored.read(), written.read()
            seen["epochs"] = (restored.epoch, written.epoch)

    result = run_training(tiny_config(**{"faults.nan_loss_epochs": [epoch]}), workspace=ws,
                          run_id="graft-diverges", progress=on_rollback)
    assert result.status == "completed"
    (rollback,) = result.history.rollbacks
    assert rollback["epoch"] == epoch and rollback["seed_id"] is not None
    layer_id, index = map(int, rollback["seed_id"].split(":"))
    assert kasmina.layers(result.model)[layer_id].stage(index) is S.ROLLED_BACK
    assert result.history.lineage["adaptations"] == []
    with Urza.open(ws) as urza:
        (report,) = urza.list_field_reports(run_id=result.run_id)
        assert report.outcome is S.ROLLED_BACK and report.kernel_artifact_id == kernel

    # The state written after the rollback is the restored checkpoint's, bit for bit, except
    # the quarantined seed (its stage, its bank, its optimizer state) and Tamiyo's quarantine.
    assert seen["epochs"] == (epoch - 1, epoch - 1)
    (restored, restored_state), (written, written_state) = seen["restored"], seen["written"]
    seed_layer = f"layers.{1}."
    differ = same_state(restored, written)
    assert differ and all(seed_layer in key and (".state." in key or ".banks." in key or key.endswith(".meta"))
                          for key in differ), differ
    assert any(key.startswith("rng.") for key in restored) and not [k for k in differ if "rng" in k]
    for key in ("rng", "history", "global_step", "epoch", "optimizer"):
        if key == "optimizer":
            host = [g for g in restored_state[key]["groups"]]
            assert [n for g in host for n in g["params"] if ".banks." not in n] == \
                [n for g in written_state[key]["groups"] for n in g["params"]]
        else:
            assert restored_state[key] == written_state[key]
    assert rollback["seed_id"] in written_state["tamiyo"]["quarantined"]


def test_a_tampered_kernel_is_refused_and_the_run_goes_on():
    root = short_dir("tolaria-tamper-")
    try:
        ws, kernels = forged_workspace(root)
        kernel = kernels["mlp_gelu_w8"]
        with Urza.open(ws) as urza:  # flip one byte of the signed weights in the artifact store
            manifest = json.loads(json.loads(urza.store.get(urza.get_kernel(kernel).kernel_binary_ref))["body"])
            weights = urza.store.path_for(manifest["files"]["weights.safetensors"])
        weights.chmod(0o644)
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        result = run_training(tiny_config(), workspace=ws)
        assert result.status == "completed" and result.summary["epochs"] == 12
        (outcome,) = result.history.lineage["other_outcomes"]
        # The refused kernel never gets past GERMINATED: Kasmina culls the seed (or, before it
        # did, Tamiyo cancelled the wait); either way the seed is free again, the reason said.
        assert outcome["outcome"] in ("CULLED", "CANCELLED") and outcome["kernel_artifact_id"] == kernel
        assert any(kernel in n and ("sha256" in n or "hash" in n) for n in result.history.notices), \
            result.history.notices
        assert result.summary["parameters"] == result.summary["host_parameters"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_with_no_validated_kernel_training_goes_on_and_says_so_once(tmp_path):
    from esper.workspace import Workspace

    ws = Workspace(short_dir("tolaria-empty-") / "ws")
    try:
        ws.create()
        notices = []
        result = run_training(tiny_config(), workspace=ws,
                              progress=lambda e: notices.append(e.text) if e.kind == "notice" else None)
        assert result.status == "completed" and result.summary["epochs"] == 12
        said = [n for n in notices if "no VALIDATED kernel" in n]
        assert len(said) == 1 and INTERFACE in said[0]
        assert result.summary["parameters"] == result.summary["host_parameters"]
        with Urza.open(ws) as urza:  # the forge is asked to compile for the seeds' interface
            assert [str(r.interface) for r in urza.requested_interfaces()] == [INTERFACE]
            waits = [d for d in urza.list_decisions(run_id=result.run_id) if d.action == "wait"]
            assert len(waits) == 1 and "No VALIDATED kernel fits" in waits[0].explanation
    finally:
        shutil.rmtree(ws.root.parent, ignore_errors=True)


# --- continual training: init_from, freeze, classes -------------------------------------------

def _host_parameters(model):
    """The host's parameters by plain module path (`layers.1.host.weight` -> `layers.1.weight`)."""
    return {k.replace(".host.", "."): p for k, p in model.named_parameters() if ".banks." not in k}


def test_a_frozen_host_from_a_saved_one_grows_seeds_and_keeps_its_weights(forged, tmp_path):
    """One phase of a continual split: a host trained elsewhere, every host parameter frozen,
    and a seed that learns on its own (whether it helps is the growth benchmark's question); the
    run ends with the host exactly as saved."""
    ws, _ = forged
    first = run_training(tiny_config(**{"kasmina.targets": [], "kasmina.include": [], "epochs": 3,
                                        "out_dir": str(tmp_path)}), workspace=None)
    saved = load_file(first.run_dir / "model.safetensors")
    second = run_training(tiny_config(**{"model.init_from": str(first.run_dir), "model.freeze": ["*"],
                                         "name": "phase-two"}), workspace=ws)
    # The seed trains in isolation from the frozen host's output gradient, grafts and is judged.
    stages = [e["stages_after"] for e in second.history.epochs]
    for stage in (S.TRAINING, S.GRAFTING, S.EVALUATING):
        assert any(stage.value in s for s in stages), f"{stage.value} never seen: {stages}"
    assert second.status == "completed" and sum(second.summary["outcomes"].values()) == 1
    host = _host_parameters(second.model)
    assert sorted(host) == sorted(saved)
    assert not same_state({k: p.cpu() for k, p in host.items()}, saved)
    assert not any(p.requires_grad for p in host.values())


def test_the_guard_reads_the_first_task_and_culls_the_grafts_that_forget_it(forged, tmp_path):
    """Phase 2 learns the first task's labels reversed, on a frozen host, with the first task
    guarded. While nothing blends, the guard reads exactly its reference (the host as phase 1
    left it, which checkpoints keep for a resume); a blending graft is culled, with the guard's
    reason, exactly when the task reads more than the limit worse than at the start and better
    without that graft."""
    ws, _ = forged
    digits = {"name": "digits", "batch_size": 64}
    first = run_training(tiny_config(**{"kasmina.targets": [], "kasmina.include": [], "data": digits,
                                        "out_dir": str(tmp_path)}), workspace=None)
    limit = 0.05
    second = run_training(tiny_config(**{
        "model.init_from": str(first.run_dir), "model.freeze": ["*"], "name": "guarded",
        "data": {**digits, "name": "tolaria_helpers:reversed_digits"}, "guard": {"data": digits},
        "kasmina.training": {"min_steps": 5, "objective": "gradient_match", "ready_loss_ratio": 1.0},
        "tamiyo.max_germinations": 2, "tamiyo.gates": {"guard_max_degradation": limit},
        "epochs": 16}), workspace=ws)
    assert second.status == "completed"
    epochs = second.history.epochs
    assert all(e["guard"]["metric"] == "accuracy" for e in epochs)
    reference = epochs[0]["guard"]["reference"]
    assert reference == first.history.epochs[-1]["validation_accuracy"]  # the same split, same host
    for epoch in epochs:
        if not set(epoch["stages_during"]) & {stage.value for stage in BLENDING}:
            assert epoch["guard"]["value"] == reference, epoch["epoch"]
    blamed = {(e["epoch"], sid) for e in epochs
              for sid in GuardReading.model_validate(e["guard"]).blamed(limit)}
    assert all(without > e["guard"]["value"] and (reference - e["guard"]["value"]) / reference > limit
               for e in epochs for sid, without in e["guard"]["without"].items() if (e["epoch"], sid) in blamed)
    with Urza.open(ws) as urza:
        culls = {(d.epoch, d.seed_id) for d in urza.list_decisions(run_id=second.run_id)
                 if d.action == "cull" and "guarded task's accuracy" in d.explanation}
    assert len(culls) == 2 and culls == blamed
    assert second.summary["outcomes"] == {"CULLED": 2}
    assert second.history.epochs[-1]["guard"]["value"] == reference  # nothing of them is left
    assert second.summary["guard"] == {"metric": "accuracy", "reference": reference, "value": reference}
    _, state = CheckpointStore(second.run_dir / "checkpoints", 3).latest().read()
    assert state["guard_reference"] == reference


def test_distillation_holds_the_grafts_off_the_guarded_task(forged, tmp_path):
    """The same reversed-digits phase 2 with the guard's gate off (limit 100%), without and with
    `guard.distill`: identical until a graft blends, then the distilled grafts move the guarded
    task less, and the task loss they train on is reported without the penalty."""
    ws, _ = forged
    digits = {"name": "digits", "batch_size": 64}
    first = run_training(tiny_config(**{"kasmina.targets": [], "kasmina.include": [], "data": digits,
                                        "out_dir": str(tmp_path)}), workspace=None)

    def phase_two(name, **guard):
        return run_training(tiny_config(**{
            "model.init_from": str(first.run_dir), "model.freeze": ["*"], "name": name,
            "data": {**digits, "name": "tolaria_helpers:reversed_digits"},
            "guard": {"data": digits, **guard}, "kasmina.train_fossils": True,
            "kasmina.training": {"min_steps": 5, "objective": "gradient_match", "ready_loss_ratio": 1.0},
            "tamiyo.max_germinations": 2, "tamiyo.gates": {"guard_max_degradation": 1.0},
            "epochs": 12}), workspace=ws)

    plain, held = phase_two("plain"), phase_two("held", distill=4.0)
    blending = {stage.value for stage in BLENDING}
    first_blend = next(e["epoch"] for e in plain.history.epochs if set(e["stages_during"]) & blending)
    for a, b in zip(plain.history.epochs, held.history.epochs):
        if a["epoch"] < first_blend:
            assert (a["train_loss"], a["guard"]) == (b["train_loss"], b["guard"]), a["epoch"]
    reference = plain.history.epochs[0]["guard"]["reference"]
    lowest = [min(e["guard"]["value"] for e in run.history.epochs) for run in (plain, held)]
    assert lowest[0] < reference and lowest[1] > lowest[0]
    assert held.history.epochs[-1]["guard"]["value"] > plain.history.epochs[-1]["guard"]["value"]


def test_a_guard_of_another_kind_of_task_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(BadInputError, match="field 'guard.data': 'digits' is a classification "
                                            "task with 10 outputs; the run's data 'two_spirals'"):
        run_training(tiny_config(guard={"data": {"name": "digits"}}, out_dir=str(tmp_path)))
    with pytest.raises(BadInputError, match="field 'guard.data.classes': 'two_spirals' has classes 0-1"):
        run_training(tiny_config(guard={"data": {"name": "two_spirals", "classes": [5]}},
                                 out_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())


def test_freeze_some_host_parameters_and_train_the_rest(tmp_path):
    config = {"kasmina.targets": [], "kasmina.include": [], "epochs": 2, "out_dir": str(tmp_path)}
    first = run_training(tiny_config(**config), workspace=None)
    saved = load_file(first.run_dir / "model.safetensors")
    second = run_training(tiny_config(**config, **{"model.init_from": str(first.run_dir),
                                                   "model.freeze": ["layers.*"], "name": "tuned"}))
    after = load_file(second.run_dir / "model.safetensors")
    assert same_state(after, saved) == ["head.bias", "head.weight"]


def test_init_from_refuses_a_grafted_model_and_an_unfit_one(reference, tmp_path):
    with pytest.raises(BadInputError, match="init_from.*1 grafted seed"):
        run_training(tiny_config(**{"model.init_from": str(reference.run_dir), "out_dir": str(tmp_path)}))
    plain = run_training(tiny_config(**{"kasmina.targets": [], "kasmina.include": [], "epochs": 1, "out_dir": str(tmp_path)}))
    with pytest.raises(BadInputError, match="init_from.*does not fit this model"):
        run_training(tiny_config(**{"model.init_from": str(plain.run_dir), "model.kwargs": {"widths": [16, 32]},
                                    "out_dir": str(tmp_path), "name": "wider"}))
    with pytest.raises(BadInputError, match="'model.freeze': 'layer.*' matches no parameter"):
        run_training(tiny_config(**{"model.freeze": ["layer.*"], "out_dir": str(tmp_path), "name": "typo"}))


@pytest.mark.parametrize("run_id", ["", "a" * 300, "../x", ".hidden"])
def test_a_run_id_that_is_not_one_path_component_is_refused(tmp_path, run_id):
    with pytest.raises(BadInputError, match="run id .* is not allowed"):
        run_training(tiny_config(out_dir=str(tmp_path)), run_id=run_id)
    assert not any(tmp_path.iterdir())

"""Contracts are strict, closed, versioned and round-trip through JSON."""

from __future__ import annotations

import itertools
import json
import time

import pytest

import esper.contracts as c
from esper.contracts import SeedLifecycle as S
from esper.errors import BadInputError

BP = "ab" * 32
KID = "abababababab-cpu-fast-0f1e2d"
HW = c.HardwareContext(device_type="cpu", memory_available_gb=8.0)
IFACE = c.KernelInterface(kind=c.LayerKind.LINEAR, in_features=37, out_features=11)
REPORT = c.UrabraskValidationReport(
    kernel_artifact_id=KID, blueprint_id=BP, passed_validation=True,
    benchmark_results={c.LATENCY_MS: 0.12, c.MEMORY_MB: 3.5}, generated_tags=["high_speed"],
    hardware_context={"device": "cpu"}, risk_score=0.1, conf_level="High")
ARTIFACT = c.CompiledKernelArtifact(
    id=KID, blueprint_id=BP, compilation_pipeline=c.CompilationPipeline.FAST, interface=IFACE,
    target="cpu", toolchain_hash="0f1e2d", kernel_binary_ref="cd" * 32,
    compilation=c.CompilationRecord(pipeline=c.CompilationPipeline.FAST, compilation_seconds=0.3,
                                    peak_memory_gb=0.1, toolchain_version="torch 2.13"),
    validation_report=REPORT)
COMMAND = c.KasminaControlCommand(
    command_id="cmd-1", run_id="run", target_layer_id=2, target_seed_id=5,
    command=c.KasminaCommandType.REQUEST_GERMINATION, kernel_artifact_id=KID,
    grafting_strategy=c.GraftingStrategy.DRIFT_CONTROLLED, selected_for_tags=["low_memory"])

SAMPLES: list[c.Contract] = [
    c.Blueprint(id=BP, name="mlp", architecture_ref=BP, interface_kind=c.LayerKind.LINEAR,
                compiled_artifacts={KID: ARTIFACT}, metadata={"note": [1, "a"]}),
    ARTIFACT,
    ARTIFACT.compilation,
    REPORT,
    c.UrabraskTagRefresh(target="cpu", tags={KID: ["high_speed", "low_memory"]},
                         population=24, policy="percentile"),
    HW,
    IFACE,
    c.SystemStatePacket(run_id="run", current_epoch=3, validation_accuracy=0.5,
                        validation_loss=1.25, hardware_context=HW,
                        health_map={"0:1": {"variance": 0.5}}, seed_states={"0:1": S.TRAINING}),
    c.AdaptationSignal(optimizer_rebuild_required=True, emergency_rollback_required=False,
                       commands=[COMMAND]),
    c.FieldReport(report_id="r", run_id="run", blueprint_id=BP, kernel_artifact_id=KID,
                  seed_id="2:5", pre_metric=0.5, post_metric=0.6, outcome=S.FOSSILIZED,
                  eval_metrics={"delta": 0.1}),
    c.KernelQuery(interface=IFACE, required_tags=["low_memory"], max_latency_ms=1.0),
    c.KernelQueryResult(matching_kernels=[ARTIFACT]),
    COMMAND,
    c.HealthSignal(run_id="run", layer_id=0, layer_name="fc1", epoch=1, step=10,
                   lifecycle=[S.DORMANT, S.GRAFTING], activation_mean=[0.0, 0.1],
                   activation_variance=[1.0, 2.0], dead_ratio=[0.0, 0.5],
                   gradient_energy=[0.1, 0.2], is_ready_for_transition=[False, True]),
    c.BlueprintSubmitted(blueprint_id=BP, submitted_by="karn"),
    c.CompilationFailed(blueprint_id=BP, stage="validation", reason="node 'h': rule 'shape'",
                        rule="shape", node="h"),
    c.KernelReady(kernel_artifact_id=KID, blueprint_id=BP, pipeline="fast", target="cpu"),
    c.KernelCharacterized(blueprint_id=BP, kernel_artifact_id=KID, status="VALIDATED",
                          tags=["high_speed"], latency_ms=0.12),
    c.EpochEvent(run_id="run", epoch=1, global_step=100, train_loss=0.7, validation_loss=0.8,
                 epochs_planned=24),
    c.HealthSummaryReport(domain_id="encoder", avg_health_score=0.9, net_volatility=0.1,
                          active_adaptations=1, atp_balance=10),
    c.AllocationCommand(target_domain_id="encoder", atp_budget_allocation=5),
    c.SeedTransition(run_id="run", seed_id="0:1", epoch=2, from_stage=S.TRAINING,
                     to_stage=S.GRAFTING),
    c.TamiyoDecision(decision_id="d", run_id="run", epoch=2, action="germinate", seed_id="0:1",
                     kernel_artifact_id=KID, explanation="plateau for 3 epochs"),
    c.RunControl(run_id="run", action=c.RunControlAction.PAUSE),
    c.DaemonHeartbeat(daemon="tezzeret", worker_id="forge-host-1", host="host", pid=1,
                      state="idle", interval_s=10.0, uptime_s=3.5,
                      published={"compilation.kernel.ready": 2}),
    c.NissaAlert(rule="consumer_lag", subject="compilation.kernel.ready/urabrask",
                 message="lag 1200 > 1000", value=1200.0, threshold=1000.0),
]


def test_every_design_contract_has_a_sample():
    # DESIGN.md section 4 lists these; each must exist and be exercised below.
    listed = ["BlueprintStatus", "KernelStatus", "Blueprint", "CompiledKernelArtifact",
              "CompilationRecord", "UrabraskValidationReport", "HardwareContext",
              "SystemStatePacket", "AdaptationSignal", "FieldReport", "KernelQuery",
              "KernelQueryResult", "KasminaControlCommand", "HealthSignal", "BlueprintSubmitted",
              "KernelReady", "KernelCharacterized", "EpochEvent", "HealthSummaryReport",
              "AllocationCommand", "SeedLifecycle", "Envelope"]
    sampled = {type(s).__name__ for s in SAMPLES}
    for name in listed:
        assert hasattr(c, name), name
        if isinstance(getattr(c, name), type) and issubclass(getattr(c, name), c.Contract):
            assert name in sampled or name == "Envelope", f"no round-trip sample for {name}"


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_json_round_trip(sample):
    text = sample.to_json()
    again = type(sample).from_json(text)
    assert again == sample
    assert again.to_json() == text
    assert type(sample).from_jsonable(json.loads(text)) == sample


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_unknown_field_is_refused(sample):
    data = sample.to_jsonable()
    data["surprise"] = 1
    with pytest.raises(BadInputError, match="surprise"):
        type(sample).from_jsonable(data)


@pytest.mark.parametrize("sample", [s for s in SAMPLES if isinstance(s, c.VersionedContract)],
                         ids=lambda s: type(s).__name__)
def test_future_schema_version_is_refused(sample):
    data = sample.to_jsonable()
    assert data["schema_version"] == c.SCHEMA_VERSION
    data["schema_version"] = c.SCHEMA_VERSION + 1
    with pytest.raises(BadInputError, match="schema_version"):
        type(sample).from_jsonable(data)


def test_strict_types_do_not_coerce():
    data = c.EpochEvent(run_id="r", epoch=1, global_step=2, train_loss=0.1,
                        validation_loss=0.2).to_jsonable()
    with pytest.raises(BadInputError, match="epoch"):
        c.EpochEvent.from_jsonable({**data, "epoch": "1"})
    with pytest.raises(BadInputError, match="run_id"):
        c.EpochEvent.from_jsonable({**data, "run_id": 5})


def test_error_message_names_source_and_field():
    with pytest.raises(BadInputError) as e:
        c.KernelQuery.from_json('{"limit": 0}', source="q.json")
    assert str(e.value).startswith("q.json: invalid KernelQuery: field 'limit'")
    assert "\n" not in str(e.value)


def test_contract_invariants():
    with pytest.raises(ValueError, match="terminal"):
        c.FieldReport(report_id="r", run_id="run", blueprint_id=BP, kernel_artifact_id=KID,
                      seed_id="0:1", pre_metric=0, post_metric=0, outcome=S.GRAFTING)
    with pytest.raises(ValueError, match="kernel_artifact_id"):
        c.KasminaControlCommand(command_id="x", run_id="r", target_layer_id=0, target_seed_id=0,
                                command=c.KasminaCommandType.REQUEST_GERMINATION)
    with pytest.raises(ValueError, match="target_stage"):
        c.KasminaControlCommand(command_id="x", run_id="r", target_layer_id=0, target_seed_id=0,
                                command=c.KasminaCommandType.ADVANCE)
    with pytest.raises(ValueError, match="entries for 2 seeds"):
        c.HealthSignal(run_id="r", layer_id=0, layer_name="l", epoch=0, step=0,
                       lifecycle=[S.DORMANT, S.DORMANT], activation_mean=[0.0],
                       activation_variance=[0.0, 0.0], dead_ratio=[0.0, 0.0],
                       gradient_energy=[0.0, 0.0], is_ready_for_transition=[False, False])
    with pytest.raises(ValueError, match="illegal transition"):
        c.SeedTransition(run_id="r", seed_id="0:0", epoch=0, from_stage=S.DORMANT,
                         to_stage=S.FOSSILIZED)
    with pytest.raises(ValueError, match="rejection_reason"):
        c.UrabraskValidationReport(kernel_artifact_id=KID, blueprint_id=BP,
                                   passed_validation=False, benchmark_results={})
    with pytest.raises(ValueError, match="pattern"):
        c.KernelReady(kernel_artifact_id="../../etc/passwd", blueprint_id=BP, pipeline="fast",
                      target="cpu")


def test_lifecycle_table_matches_appendix_b():
    assert len(S) == 12  # the 11 stages plus LOADING
    assert [s.code for s in S] == list(range(12))
    assert all(S.from_code(s.code) is s for s in S)
    happy = [S.DORMANT, S.GERMINATED, S.LOADING, S.TRAINING, S.GRAFTING, S.STABILIZATION,
             S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED]
    for a, b in itertools.pairwise(happy):
        assert a.can_transition_to(b)
    assert S.LOADING.can_transition_to(S.CULLED)  # a load failure culls
    assert S.CULLED.can_transition_to(S.DORMANT) and S.CANCELLED.can_transition_to(S.DORMANT)
    assert not S.FOSSILIZED.can_transition_to(S.CULLED)
    assert not S.ROLLED_BACK.can_transition_to(S.DORMANT)  # a hard lock
    assert not S.DORMANT.can_transition_to(S.GRAFTING)
    assert not S.GRAFTING.can_transition_to(S.TRAINING)
    assert {s for s in S if s.is_terminal} == set(c.TERMINAL_STAGES)


def test_envelope_checks_payload_against_topic():
    event = c.EpochEvent(run_id="r", epoch=1, global_step=2, train_loss=0.1, validation_loss=0.2)
    env = c.Envelope.wrap(c.Topic.SYSTEM_EVENTS_EPOCH, event, sender_id="tolaria", trace_id="t1")
    assert env.topic.stream_key == "esper:system.events.epoch"
    again = c.Envelope.from_json(env.to_json())
    assert again == env and again.message == event and again.trace_id == "t1"
    with pytest.raises(TypeError, match="EpochEvent"):
        c.Envelope.wrap(c.Topic.CONTROL_RUN, event, sender_id="x")
    bad = env.to_jsonable()
    bad["payload"]["epoch"] = -1
    with pytest.raises(BadInputError, match="field 'payload.epoch'"):
        c.Envelope.from_jsonable(bad)
    with pytest.raises(ValueError, match="carries RunControl, not EpochEvent"):
        c.Envelope(topic=c.Topic.CONTROL_RUN, sender_id="x", payload=event)
    bad = env.to_jsonable()
    bad["topic"] = "no.such.topic"
    with pytest.raises(BadInputError, match="topic"):
        c.Envelope.from_jsonable(bad)


def test_every_topic_has_a_payload_and_event_ids_sort_by_time():
    assert set(c.TOPIC_PAYLOADS) == set(c.Topic)
    ids = []
    for _ in range(5):
        ids += [c.new_event_id() for _ in range(20)]
        time.sleep(0.002)  # UUIDv7 orders by millisecond; within one, only uniqueness holds
    assert len(set(ids)) == len(ids)
    firsts = ids[::20]
    assert firsts == sorted(firsts)
    event = c.RunControl(run_id="r", action=c.RunControlAction.STOP)
    root = c.Envelope.wrap(c.Topic.CONTROL_RUN, event, sender_id="x")
    assert root.trace_id == root.event_id


def test_interface_parse_and_str():
    assert str(c.KernelInterface.parse("linear:37:11")) == "linear:37:11"
    assert c.KernelInterface.parse("conv2d:6:10").stride == 1
    assert str(c.KernelInterface.parse("conv2d:6:10:2")) == "conv2d:6:10:2"
    for bad in ["linear:3", "linear:0:4", "conv3d:1:2", "linear:a:b", "linear:1:2:2", "",
                "linear:99999999999999999999999:16", "conv2d:4:4:2147483648"]:
        with pytest.raises(BadInputError, match="bad interface"):
            c.KernelInterface.parse(bad)
    with pytest.raises(BadInputError, match="less than or equal to 2147483647"):
        c.KernelInterface.from_json('{"kind": "linear", "in_features": 2147483648, "out_features": 4}')

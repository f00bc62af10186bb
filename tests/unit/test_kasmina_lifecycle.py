"""The lifecycle table of HLD Appendix B, enforced on a live layer; commands applied atomically
at epoch boundaries."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from torch import nn

import kasmina
from esper.blueprints import standard_library
from esper.contracts import (
    LIFECYCLE_TRANSITIONS,
    KasminaCommandType,
    KasminaControlCommand,
)
from esper.contracts import SeedLifecycle as S
from esper.errors import IllegalTransitionError

IR = next(ir for ir in standard_library() if ir.name == "mlp_relu_w4")


def _path_to(stage: S) -> list[S]:
    """The shortest legal path DORMANT -> stage (breadth first over the table)."""
    previous = {S.DORMANT: None}
    queue = deque([S.DORMANT])
    while queue:
        current = queue.popleft()
        for nxt in sorted(LIFECYCLE_TRANSITIONS[current], key=lambda s: s.code):
            if nxt not in previous:
                previous[nxt] = current
                queue.append(nxt)
    path = []
    while stage is not S.DORMANT:
        path.append(stage)
        stage = previous[stage]
    return path[::-1]


def _layer():
    source = kasmina.BlueprintKernelSource()
    model, _ = kasmina.wrap(nn.Sequential(nn.Linear(6, 8)), {"seeds_per_layer": 2}, kernel_source=source)
    layer = kasmina.layers(model)[0]
    return model, layer, source.add(IR, layer.seed_interface)


def _drive(layer, kernel, path):
    for stage in path:
        layer.transition(0, stage, kernel_artifact_id=kernel if stage is S.GERMINATED else None)


PAIRS = [(a, b) for a in S for b in S]


@pytest.mark.parametrize("current,target", PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_every_transition_follows_the_table(current, target):
    model, layer, kernel = _layer()
    _drive(layer, kernel, _path_to(current))
    assert layer.stage(0) is current
    if target in LIFECYCLE_TRANSITIONS[current]:
        transition = layer.transition(0, target, kernel_artifact_id=kernel)
        assert (transition.from_stage, transition.to_stage) == (current, target)
        assert layer.stage(0) is target and layer.state.lifecycle[0] == target.code
        assert layer.verify_state() is None
        model(torch.randn(3, 6))  # every stage runs a forward
    else:
        with pytest.raises(IllegalTransitionError, match=f"{current.value} -> {target.value}"):
            layer.transition(0, target, kernel_artifact_id=kernel)
        assert layer.stage(0) is current


def _cmd(seed, kind, **kw):
    return KasminaControlCommand(command_id=f"{seed}-{kind.value}", run_id="run", target_layer_id=0,
                                 target_seed_id=seed, command=kind, **kw)


def test_commands_wait_for_the_boundary_and_illegal_ones_are_rejected_not_raised():
    model, layer, kernel = _layer()
    layer.queue(_cmd(0, KasminaCommandType.REQUEST_GERMINATION, kernel_artifact_id=kernel))
    layer.queue(_cmd(1, KasminaCommandType.ADVANCE, target_stage=S.GRAFTING))  # illegal from DORMANT
    assert layer.stages == [S.DORMANT, S.DORMANT]
    model(torch.randn(2, 6))
    report = layer.on_epoch_end(run_id="run")
    assert [(t.seed_id, t.to_stage) for t in report.transitions] == [("0:0", S.GERMINATED)]
    (rejected, reason), = report.rejected
    assert rejected.target_seed_id == 1 and "DORMANT -> GRAFTING" in reason
    assert layer.stages == [S.GERMINATED, S.DORMANT] and layer.pending == []
    assert layer.health_signal().is_ready_for_transition[0] in (True, False)


def test_loading_ends_at_the_boundary_after_the_load_and_cull_embargo_expires():
    model, layer, kernel = _layer()
    kasmina.dispatch(model, [_cmd(0, KasminaCommandType.REQUEST_GERMINATION, kernel_artifact_id=kernel)])
    layer.on_epoch_end()
    layer.wait_for_loads()
    assert layer.health_signal().is_ready_for_transition[0]  # the kernel is fetched
    kasmina.dispatch(model, [_cmd(0, KasminaCommandType.ADVANCE, target_stage=S.LOADING)])
    layer.on_epoch_end()
    assert layer.stage(0) is S.LOADING
    report = layer.on_epoch_end()
    assert [(t.from_stage, t.to_stage) for t in report.transitions] == [(S.LOADING, S.TRAINING)]
    assert report.optimizer_rebuild_required
    kasmina.dispatch(model, [_cmd(0, KasminaCommandType.CULL)])
    layer.on_epoch_end()
    assert layer.stage(0) is S.CULLED
    layer.on_epoch_end()
    assert layer.stage(0) is S.DORMANT  # discarded at the next boundary
    # embargo_epochs=5: germination is refused at the boundaries 2, 3 and 4 after the cull
    # (boundary 1 discards it) and accepted at the fifth.
    for remaining in (3, 2, 1):
        layer.queue(_cmd(0, KasminaCommandType.REQUEST_GERMINATION, kernel_artifact_id=kernel))
        report = layer.on_epoch_end()
        assert "embargo" in report.rejected[0][1] and layer.stage(0) is S.DORMANT
        assert int(layer.state.embargo[0]) == remaining
    layer.queue(_cmd(0, KasminaCommandType.REQUEST_GERMINATION, kernel_artifact_id=kernel))
    assert layer.on_epoch_end().transitions[0].to_stage is S.GERMINATED


def test_cancel_returns_to_dormant_without_embargo():
    _model, layer, kernel = _layer()
    _drive(layer, kernel, [S.GERMINATED, S.LOADING, S.TRAINING])
    layer.queue(_cmd(0, KasminaCommandType.CANCEL_GERMINATION))
    layer.on_epoch_end()
    assert layer.stage(0) is S.CANCELLED and len(layer.banks) == 0
    layer.on_epoch_end()
    assert layer.stage(0) is S.DORMANT and int(layer.state.embargo[0]) == 0


def test_queue_refuses_commands_for_other_layers_or_missing_seeds():
    from esper.errors import BadInputError

    _, layer, _ = _layer()
    with pytest.raises(BadInputError, match="no seed 7"):
        layer.queue(_cmd(7, KasminaCommandType.CULL))
    other = KasminaControlCommand(command_id="x", run_id="r", target_layer_id=3, target_seed_id=0,
                                  command=KasminaCommandType.CULL)
    with pytest.raises(BadInputError, match="targets layer 3"):
        layer.queue(other)

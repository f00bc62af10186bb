"""Stage 1 on real modules with each fault the gatekeeper must catch (wrong shape and
non-determinism cannot be planted in a forge artifact on CPU; see test_urabrask_bench.py)."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn

from esper.blueprints import build, standard_library
from esper.contracts import KernelInterface
from pipelines.urabrask.gauntlet import (
    GateFailure,
    GauntletJob,
    _no_compile_workers,
    _time,
    gatekeep,
    profile,
)

FACE = KernelInterface.parse("linear:12:5")


def good_module() -> nn.Module:
    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w32_dropout")
    return build(ir, FACE, seed=0)


class WrongWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = good_module()

    def forward(self, x):
        return torch.cat([self.inner(x), self.inner(x)[..., :1]], dim=-1)  # 6 wide, not 5


class Unseeded(nn.Module):
    """Noise that the torch seed does not govern (as racy accumulation would be)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = good_module()

    def forward(self, x):
        y = self.inner(x)
        noise = int.from_bytes(os.urandom(2), "little") * 1e-9
        return y + noise * y.detach().abs().clamp(max=1)


class FastByDefault(Unseeded):
    """Nondeterministic by default, exact under torch's deterministic mode, as cuDNN's
    atomics-based convolution weight gradients are on a GPU."""

    def forward(self, x):
        if torch.are_deterministic_algorithms_enabled():
            return self.inner(x)
        return super().forward(x)


def test_a_good_module_with_dropout_passes_and_is_profiled():
    module = good_module()
    gate = gatekeep(module, module, FACE, "rows", torch.float32, "cpu", seed=3)
    assert gate == {"deterministic_default_mode": 1.0}
    metrics, _ = profile(module, module, FACE, "rows", torch.float32,
                                GauntletJob(kernel_id="x" * 12 + "-cpu-fast-abcdef",
                                            round_seconds=0.01))
    assert metrics["latency_ms_p99"] >= metrics["latency_ms_p50"] > 0
    assert metrics["memory_mb_peak"] > 0 and metrics["precision_drift_vs_fp64"] < 1e-4
    assert metrics["param_count"] == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("make", "check"), [
    (WrongWidth, "shape"),
    (Unseeded, "determinism"),
])
def test_faults_are_named(make, check):
    module = make()
    with pytest.raises(GateFailure) as caught:
        gatekeep(module, module, FACE, "rows", torch.float32, "cpu", seed=3)
    assert caught.value.check == check


def test_nonzero_output_at_init_breaks_function_preservation():
    module = good_module()
    with torch.no_grad():
        module.layers[-1].bias.fill_(0.5)
    with pytest.raises(GateFailure) as caught:
        gatekeep(module, module, FACE, "rows", torch.float32, "cpu", seed=3)
    assert caught.value.check == "function_preservation"


def test_inf_in_a_weight_is_a_non_finite_output():
    module = good_module()
    with torch.no_grad():
        module.layers[0].weight[0, 0] = float("inf")
    with pytest.raises(GateFailure) as caught:
        gatekeep(module, module, FACE, "rows", torch.float32, "cpu", seed=3)
    assert caught.value.check == "finite_output"


def test_nondeterminism_by_default_passes_when_deterministic_mode_is_exact():
    module = FastByDefault()
    gate = gatekeep(module, module, FACE, "rows", torch.float32, "cpu", seed=3)
    assert gate == {"deterministic_default_mode": 0.0}
    assert not torch.are_deterministic_algorithms_enabled()  # restored


def test_timing_sizes_rounds_by_the_warm_up_and_leaves_the_collector_on():
    job = GauntletJob(kernel_id="x" * 12 + "-cpu-fast-abcdef", rounds=3, round_seconds=0.002,
                      min_calls=2, max_calls=40, warmup_seconds=0.001)
    timing = _time(lambda: sum(range(2000)), job)
    assert gc.isenabled()
    assert 3 * 2 <= timing["calls"] <= 3 * 40
    assert timing["p99"] >= timing["p50"] > 0 and timing["mean"] > 0 and timing["cv_pct"] >= 0


def test_the_child_starts_no_compile_workers(monkeypatch):
    monkeypatch.delenv("TORCH_WARM_POOL", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    _no_compile_workers()
    assert os.environ["TORCH_WARM_POOL"] == "0"
    assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "1"

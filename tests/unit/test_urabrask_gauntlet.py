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


def test_cpu_timing_is_per_call_and_says_so():
    module = good_module()
    gatekeep(module, module, FACE, "rows", torch.float32, "cpu", seed=3)
    notes: dict[str, str] = {}
    metrics, baseline = profile(module, module, FACE, "rows", torch.float32,
                                GauntletJob(kernel_id="x" * 12 + "-cpu-fast-abcdef",
                                            round_seconds=0.01), notes=notes)
    assert notes == {"latency_timing": "perf_counter_per_call",
                     "train_step_timing": "perf_counter_per_call"}
    assert metrics["latency_cuda_graph"] == 0.0 and metrics["train_step_cuda_graph"] == 0.0
    assert metrics["train_step_ms_p99"] >= metrics["train_step_ms_p50"] > 0
    for name in ("latency", "train_step"):
        assert metrics[f"{name}_spread_pct"] >= 0 and metrics[f"{name}_cv_pct"] >= 0
    assert baseline == {"speedup_vs_eager": 1.0, "latency_change_pct_vs_eager": 0.0}


def test_a_refused_graph_capture_falls_back_to_per_call_timing_and_says_why(monkeypatch):
    from pipelines.urabrask import gauntlet

    def refuse(fn, job, *, before_capture=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(gauntlet, "_time_cuda_graph", refuse)
    monkeypatch.setattr(gauntlet, "_recover_from_capture", lambda: None)
    monkeypatch.setattr(gauntlet, "_sync", lambda cuda: None)
    monkeypatch.setattr(gauntlet, "_rounds", lambda fn, rounds, calls, cuda: (
        [1.0] * rounds * calls, [1.0] * rounds))
    notes: dict[str, str] = {}
    job = GauntletJob(kernel_id="x" * 12 + "-h100-fast-abcdef", device="cuda",
                      round_seconds=0.001, warmup_seconds=0.0001)
    timing = gauntlet._measure(lambda: None, job, notes, "latency")
    assert timing["cuda_graph"] == 0.0 and timing["mean"] == 1.0 and timing["spread_pct"] == 0
    assert notes["latency_timing"] == "cuda_events_per_call"
    assert "stream is capturing" in notes["latency_graph_failure"]


def test_repeats_summarise_to_median_spread_and_cv():
    from pipelines.urabrask.gauntlet import _summarise

    timing = _summarise([1.0, 1.1, 0.9, 1.0, 1.0], calls=500, cuda_graph=True)
    assert timing["p50"] == 1.0 and timing["cuda_graph"] == 1.0 and timing["calls"] == 500
    assert timing["spread_pct"] == pytest.approx(20.0)
    assert timing["cv_pct"] == pytest.approx(100 * (0.004 ** 0.5) / 1.0)


def test_the_gpu_lock_is_none_on_cpu(tmp_path, monkeypatch):
    from pipelines.urabrask.gpu_lock import GpuLock

    monkeypatch.setenv("ESPER_GPU_LOCK_DIR", str(tmp_path))
    assert GpuLock.for_device("cpu") is None
    assert list(tmp_path.iterdir()) == []


def _can_lock(path, mode) -> bool:
    """Whether another open file could take `mode` on `path` right now (never waits)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_active_holders_share_the_gpu_and_a_measurement_has_it_alone(tmp_path):
    import fcntl

    from pipelines.urabrask.gpu_lock import GpuLock

    lock = GpuLock(str(tmp_path), "gpu-uuid")
    with lock.active(), lock.active():  # two at once: no wait
        assert _can_lock(lock.room, fcntl.LOCK_SH)
        assert not _can_lock(lock.room, fcntl.LOCK_EX)
        assert _can_lock(lock.turnstile, fcntl.LOCK_EX)  # passed through, not held
    with lock.measuring():
        assert not _can_lock(lock.room, fcntl.LOCK_SH)
        assert not _can_lock(lock.turnstile, fcntl.LOCK_EX)
    assert _can_lock(lock.room, fcntl.LOCK_EX) and _can_lock(lock.turnstile, fcntl.LOCK_EX)


def test_a_waiting_measurement_goes_before_work_that_arrives_after_it(tmp_path):
    """Writer preference: children that keep starting cannot starve a measurement."""
    import fcntl
    import threading

    from pipelines.urabrask.gpu_lock import GpuLock

    lock = GpuLock(str(tmp_path), "gpu-uuid")
    order: list[str] = []
    release_first = threading.Event()

    def first_active() -> None:
        with lock.active():
            order.append("active 1")
            release_first.wait()

    def measurement() -> None:
        with lock.measuring():
            order.append("measure")

    def second_active() -> None:
        with lock.active():
            order.append("active 2")

    threads = [threading.Thread(target=first_active)]
    threads[0].start()
    while not order:  # the first holder is in
        threads[0].join(0.001)
    threads.append(threading.Thread(target=measurement))
    threads[1].start()
    while _can_lock(lock.turnstile, fcntl.LOCK_EX):  # the measurement waits for the room
        threads[1].join(0.001)
    threads.append(threading.Thread(target=second_active))
    threads[2].start()
    release_first.set()
    for thread in threads:
        thread.join()
    assert order == ["active 1", "measure", "active 2"]


def test_a_child_holds_the_gpu_as_active_until_it_exits(tmp_path):
    import fcntl
    import subprocess
    import sys

    from pipelines.urabrask.gpu_lock import GpuLock

    lock = GpuLock(str(tmp_path), "gpu-uuid")
    code = ("import sys; from pipelines.urabrask.gpu_lock import GpuLock; "
            f"GpuLock({str(tmp_path)!r}, 'gpu-uuid').hold_active_until_exit(); "
            "print('held', flush=True); sys.stdin.readline()")
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        assert child.stdout.readline().strip() == "held"
        assert not _can_lock(lock.room, fcntl.LOCK_EX)
        assert _can_lock(lock.room, fcntl.LOCK_SH)
    finally:
        child.communicate("\n")
    assert child.returncode == 0
    assert _can_lock(lock.room, fcntl.LOCK_EX)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_timing_of_forward_and_train_step(tmp_path, monkeypatch):
    from pipelines.urabrask.gpu_lock import GpuLock

    monkeypatch.setenv("ESPER_GPU_LOCK_DIR", str(tmp_path))
    module = good_module().cuda()
    notes: dict[str, str] = {}
    lock = GpuLock.for_device("cuda")
    with lock.active():
        gatekeep(module, module, FACE, "rows", torch.float32, "cuda", seed=3)
    with lock.measuring():
        metrics, _ = profile(module, module, FACE, "rows", torch.float32,
                             GauntletJob(kernel_id="x" * 12 + "-h100-fast-abcdef",
                                         device="cuda", round_seconds=0.01), notes=notes)
    assert notes == {"latency_timing": "cuda_graph_replay",
                     "train_step_timing": "cuda_graph_replay"}
    assert metrics["latency_cuda_graph"] == 1.0 and metrics["train_step_cuda_graph"] == 1.0
    assert metrics["train_step_ms_mean"] > metrics["latency_ms_mean"] > 0
    assert len(list(tmp_path.glob("esper-urabrask-gpu-*.lock"))) == 1

"""Stages 1 and 2 of the gauntlet (DESIGN.md section 9, HLD E.2): they run in the sandboxed
child (worker.py), never in the daemon.

    result = run_gauntlet(urza, GauntletJob(kernel_id=..., device="cpu"))

Stage 1, the gatekeeper, in this order (the first failure is the rejection reason):

1. load: `load_kernel` verifies the forge signature and every hash before it deserializes.
   A load that fails because the workspace's store cannot give back one of the kernel's blobs
   intact (`store_damage`) judges nothing: the result says so and the bench leaves the kernel
   waiting (bench.py);
2. forward on a fresh random input of the interface's form: output shape per the interface,
   finite output, exactly zero output at init (function preservation);
3. backward against a random upstream gradient: finite gradients;
4. gradient flow: the op feeding the output starts at zero, so at step 0 only it gets gradient.
   One SGD step on a random target moves it; then every parameter must get a nonzero, finite
   gradient (the builder's own invariant, tests/unit/test_blueprints_library.py);
5. determinism: two forward+backward runs from the same RNG seed give bitwise-equal outputs and
   gradients. Randomness by design (dropout) is reproducible from the seed and passes;
   randomness the seed does not govern (racy accumulation, uninitialised memory) does not.
   Some library algorithms are nondeterministic by default on a GPU (cuDNN's weight gradients
   of some convolutions accumulate with atomics): when the default mode differs, the check is
   repeated under `torch.use_deterministic_algorithms(True)`; a kernel that is deterministic
   there passes with `deterministic_default_mode = 0` in its metrics, one that is not (or uses
   an op with no deterministic implementation) is rejected.

Stage 2, the profiler, measures the kernel at the weights after that one step (at init the
output is exactly zero, which would hide precision drift):

- latency of the forward pass (train mode, grad on: how Kasmina runs a graft), warm-up
  excluded. On a GPU (`_time_cuda_graph`): `graph_calls` calls captured as one CUDA graph
  (warm-up on a side stream first, as torch.cuda.graphs requires), replayed back to back for
  `rounds` repeats of ~`round_seconds` each, an event pair around each repeat. That is the GPU's
  own time per call: the standard library's kernels are launch-bound at these sizes (one call is
  a few microseconds of GPU work and 0.05-0.4 ms of host time to issue it), so per-call events
  measured the host's Python and dispatch overhead, which moved by up to 30% between fresh
  processes on one H100 (docs/bench-gauntlet-gpu.md). mean over the repeats, p50 their median,
  p99 their 99th percentile, CV% and spread (max - min over the median) across them. Where a
  kernel cannot be captured (a host sync inside it, say) the profiler falls back to an event
  pair per call as below; `latency_cuda_graph` / `train_step_cuda_graph` (1 or 0) and the
  hardware context's `latency_timing` say which method measured the report. On CPU: at least
  `warmup_calls` and `warmup_seconds` of warm-up (its mean call time sizes the rounds), then
  `rounds` rounds of timed calls (as many as fit `round_seconds`, at most `max_calls`), each
  round after a full garbage collection (the collector stays on, as in training),
  `perf_counter` around each call; mean/p50/p99 over every call; CV% of the round means;
- a GPU is measured by one gauntlet at a time, and while it is, no other gauntlet's GPU work
  runs: profiling holds a per-GPU reader-writer lock exclusively, while context creation,
  loading, gatekeeping and the child's exit hold it shared (gpu_lock.py: on an H100 other
  processes' context creation, copies and exit beside a measurement moved graph-replay timings
  by 5-7% either way; alone, fresh processes agree to ~0.3%). Benches sharing a GPU overlap
  their start-up, loading and gatekeeping, never a measurement;
- forward+backward latency, throughput (calls/s and positions/s);
- peak memory of one forward+backward: `torch.cuda.max_memory_allocated` above the baseline on
  GPU; on CPU, tensor-bytes accounting (parameters + gradients + input + output + every tensor
  autograd saves for backward, storages counted once). RSS deltas on CPU are dominated by the
  allocator's caching and vary run to run; the accounting is exact and repeatable;
- parameter count, FLOPs (the validator's flops per input position x positions);
- precision drift: max |y - y64| / max |y64| against the same module in float64;
- baseline comparison with the eager `fast` kernel of the same blueprint: a `fast` artifact is
  the builder's eager module, so a compiled kernel is timed against its own eager module (same
  blueprint, same weights) in the same child, as a latency ratio and a change in percent. The
  bench adds the fast kernel's own measured latency from the catalog when it is VALIDATED.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from esper.contracts import LATENCY_MS, MEMORY_MB
from pipelines.urabrask.gpu_lock import GpuLock
from pipelines.urabrask.tags import DRIFT_LIMITS

if TYPE_CHECKING:
    import torch

    from esper.urza import Urza

# Input sizes. Gatekeeper inputs are small and not powers of two; profiler inputs are larger.
GATE_ROWS, GATE_SEQ, GATE_MAP = 6, (3, 5), (3, 9)  # rows; (batch, T); (batch, H=W)
PROFILE_ROWS, PROFILE_SEQ, PROFILE_MAP = 256, (16, 32), (16, 32)


@dataclass(frozen=True)
class GauntletJob:
    """What the child runs. JSON in, no pickle."""

    kernel_id: str
    device: str = "cpu"
    rounds: int = 5
    round_seconds: float = 0.1  # timed work per round (calls are added up to this)
    min_calls: int = 5
    max_calls: int = 2000
    warmup_calls: int = 3
    warmup_seconds: float = 0.05
    seed: int = 1234
    graph_calls: int = 32  # calls captured in one CUDA graph (GPU timing)
    cuda_graphs: bool = True  # False: an event pair per call on a GPU, as before graphs

    @classmethod
    def from_jsonable(cls, data: dict[str, Any]) -> GauntletJob:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def to_jsonable(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GauntletResult:
    """What the child reports. `check` names the failed stage-1 check (None when passed)."""

    kernel_id: str
    passed: bool
    check: str | None = None
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    hardware: dict[str, str] = field(default_factory=dict)
    # Where the child's time went (s): `process_before` (interpreter start, imports, catalog
    # open: the process's age when the gauntlet began; Linux only), `load`, `gatekeep`,
    # `profile`. Not part of the report: for the bench's own cost (scripts/gpu_gauntlet.py).
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Set when the load failed on damage to the workspace's artifact store (`store_damage`):
    # one line naming the blob. No evidence about the kernel: the bench does not judge it.
    store_damage: str | None = None

    def to_jsonable(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_jsonable(cls, data: dict[str, Any]) -> GauntletResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class GateFailure(Exception):
    """A stage-1 check failed: `check` is its name, the message the one-line reason."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(reason)
        self.check = check


def run_gauntlet(urza: Urza, job: GauntletJob, *,
                 reached_kernel: Callable[[], None] | None = None) -> GauntletResult:
    """Load, gatekeep and profile one kernel. A failed check is a result, never a raise.
    `reached_kernel` is called once everything the kernel does not govern is done (imports, the
    GPU lock, CUDA's context), just before the kernel is loaded: the worker tells its parent
    there, so a limit too small for the process to get this far blames no kernel (sandbox.py)."""
    import torch

    from esper.blueprints import load_ir, validate
    from esper.errors import EsperError
    from pipelines.tezzeret.compile import input_form
    from pipelines.tezzeret.loader import load_kernel

    stages = {"process_before": _process_age_s()}
    clock = time.perf_counter()
    _no_compile_workers()
    lock = GpuLock.for_device(job.device)
    try:
        # Context creation, loading and gatekeeping share the GPU with other gauntlets' such work;
        # none of it may run inside another's measurement (gpu_lock.py).
        with _held(lock, "active"):
            clock = _lap(stages, "gpu_active_wait", clock)
            hardware = hardware_context(job.device)
            if job.device.startswith("cuda"):
                torch.empty(1, device=job.device)
                clock = _lap(stages, "cuda_init", clock)
            if reached_kernel is not None:
                reached_kernel()
            try:
                kernel = load_kernel(urza, job.kernel_id, device=job.device,
                                     require_validated=False)
                ir = load_ir(urza.store.get(kernel.manifest.blueprint_id),
                             source=f"blueprint {kernel.manifest.blueprint_id[:12]}")
            except (EsperError, OSError) as e:  # OSError: a key file the loader cannot open
                return GauntletResult(job.kernel_id, False, "load", f"load: {e}",
                                      hardware=hardware, stage_seconds=stages,
                                      store_damage=store_damage(urza, job.kernel_id))
            interface = kernel.manifest.interface
            form = input_form(ir, interface)
            dtype = getattr(torch, kernel.manifest.dtype)
            clock = _lap(stages, "load", clock)
            gate = gatekeep(kernel, kernel.module, interface, form, dtype, job.device,
                            seed=job.seed)
            clock = _lap(stages, "gatekeep", clock)
        with _held(lock, "measuring"):
            clock = _lap(stages, "gpu_lock_wait", clock)
            metrics, baseline = profile(kernel, kernel.module, interface, form, dtype, job,
                                        notes=hardware)
            _lap(stages, "profile", clock)
        metrics.update(gate)
    except GateFailure as e:
        return GauntletResult(job.kernel_id, False, e.check, f"{e.check}: {e}", hardware=hardware,
                              stage_seconds=stages)
    metrics["flops_per_position"] = float(validate(ir, interface).checks[0].flops_per_position)
    metrics["gflops_per_call"] = metrics["flops_per_position"] * metrics["positions"] / 1e9
    metrics["numerically_stable_limit"] = DRIFT_LIMITS[kernel.manifest.dtype]
    if kernel.fallback_reason:
        hardware["compiled_fallback"] = kernel.fallback_reason[:200]
    return GauntletResult(job.kernel_id, True, metrics=metrics, baseline=baseline,
                          hardware=hardware, stage_seconds=stages)


def store_damage(urza: Urza, kernel_id: str) -> str | None:
    """What of this kernel the workspace cannot give back intact, in one line naming the blob,
    or None if its blobs are whole. Damage is what `esper library verify` finds in the store (a
    blob missing, or not hashing to its name) or a forge public key that cannot be read; it is
    no evidence about the kernel, whose verdict is one-way, so the bench does not judge it.

    The blobs are the loader's: the manifest, the blueprint IR, and the files the manifest names
    once it verifies against the forge key. A manifest that does not verify is evidence (a
    tampered artifact is refused): None, whatever files it names. One that verifies but names
    another kernel is the load's to refuse, once the blobs are whole."""
    from esper.errors import EsperError, IntegrityError, NotFoundError
    from esper.signing import open_signed
    from pipelines.tezzeret.artifact import Manifest

    record = urza.kernel_load_record(kernel_id)
    stored: dict[str, bytes] = {}
    for name, digest in (("manifest", record.kernel_binary_ref),
                         ("blueprint IR", record.blueprint_id)):
        try:
            stored[name] = urza.store.get(digest)
        except (NotFoundError, IntegrityError) as e:
            return f"{name}: {e}"
    try:
        forge_key = urza.workspace.public_key("forge")
    except IntegrityError as e:
        return str(e)  # it names the key file
    what = f"kernel {record.id}: manifest"
    try:
        manifest = Manifest.from_json(open_signed(stored["manifest"], forge_key, what=what),
                                      source=what)
    except EsperError:
        return None
    for name, digest in sorted(manifest.files.items()):
        try:
            urza.store.get(digest)
        except (NotFoundError, IntegrityError) as e:
            return f"{name}: {e}"
    return None


def _no_compile_workers() -> None:
    """The child runs precompiled code: no pool of Inductor compile workers. Where Triton is
    installed, loading a compiled function warms one worker process per core (16 on the H100
    host: 4.1-7.2 GB resident with the child, past its 4 GB limit, every `standard` kernel
    rejected); a recompile, should one happen, runs in this process instead. Environment
    variables, read when Inductor is first imported or warms its pool; the config too if Inductor
    is already imported (importing it here would cost a fast kernel ~1 s)."""
    os.environ["TORCH_WARM_POOL"] = "0"
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    config = sys.modules.get("torch._inductor.config")
    if config is not None:
        config.compile_threads = 1


def _lap(stages: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    stages[name] = now - since
    return now


def _process_age_s() -> float:
    """Seconds since this process started (Linux /proc; -1 where it cannot tell)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        start_ticks = int(stat[stat.rindex(b")") + 2:].split()[19])  # starttime, clock ticks
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return -1.0


@contextmanager
def _held(lock: GpuLock | None, mode: str):
    """`lock.active()` or `lock.measuring()`; nothing on CPU (lock None)."""
    if lock is None:
        yield
        return
    with getattr(lock, mode)():
        yield


# Inputs -----------------------------------------------------------------------------------------

def input_shape(form: str, in_features: int, *, profile: bool) -> tuple[int, ...]:
    if form == "maps":
        batch, side = PROFILE_MAP if profile else GATE_MAP
        return (batch, in_features, side, side)
    if form == "sequence":
        batch, steps = PROFILE_SEQ if profile else GATE_SEQ
        return (batch, steps, in_features)
    return (PROFILE_ROWS if profile else GATE_ROWS, in_features)


def output_shape(interface, x_shape: tuple[int, ...]) -> tuple[int, ...]:
    """What the interface promises for an input of `x_shape`."""
    from esper.contracts import LayerKind

    if interface.kind is LayerKind.CONV2D:
        s = interface.stride
        return (x_shape[0], interface.out_features, -(-x_shape[2] // s), -(-x_shape[3] // s))
    return (*x_shape[:-1], interface.out_features)


# Stage 1 ----------------------------------------------------------------------------------------

def gatekeep(kernel, module, interface, form: str, dtype, device: str, *,
             seed: int) -> dict[str, float]:
    """Stage 1 on `kernel` (a callable; `module` holds its parameters). Raises GateFailure.
    Leaves `module` one SGD step past its initial weights (what the profiler measures).
    Returns what it measured on the way (`deterministic_default_mode`)."""
    import torch

    module.train()
    params = dict(module.named_parameters())
    g = torch.Generator(device="cpu").manual_seed(seed)
    x_shape = input_shape(form, interface.in_features, profile=False)
    x = torch.randn(x_shape, generator=g).to(device=device, dtype=dtype)
    expected = output_shape(interface, x_shape)

    # Forward: shape, finiteness, function preservation.
    torch.manual_seed(seed)
    y = kernel(x)
    if tuple(y.shape) != expected:
        raise GateFailure("shape", f"output shape {tuple(y.shape)} for input {x_shape}; the "
                                   f"interface {interface} needs {expected}")
    if not torch.isfinite(y).all():
        raise GateFailure("finite_output", f"{_count_bad(y)} non-finite values in the output")
    if not torch.equal(y, torch.zeros_like(y)):
        raise GateFailure("function_preservation",
                          f"output at init is not zero (max |y| {y.abs().max().item():.3g})")

    # Backward: finite gradients.
    upstream = torch.randn(expected, generator=g).to(device=device, dtype=dtype)
    y.backward(upstream)
    _check_grads(params, step=0)

    # Gradient flow: one step moves the zero-initialised op; then every parameter learns.
    target = torch.randn(expected, generator=g).to(device=device, dtype=dtype)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    torch.nn.functional.mse_loss(kernel(x).float(), target.float()).backward()
    # One plain SGD step (lr 0.1) by hand: torch.optim imports torch._dynamo (~1-2 s per child).
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.1)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y1 = kernel(x)
    if not torch.isfinite(y1).all():
        raise GateFailure("finite_output", f"{_count_bad(y1)} non-finite values in the output "
                                           "after one training step")
    torch.nn.functional.mse_loss(y1.float(), target.float()).backward()
    _check_grads(params, step=1)
    for name, p in params.items():
        if p.grad is None or not bool((p.grad != 0).any()):
            raise GateFailure("gradient_flow", f"parameter {name} receives no gradient after "
                                               "one training step")

    # Determinism: the same seed twice gives the same output and gradients, bit for bit.
    difference = _twice_differs(kernel, module, params, x, upstream, seed)
    deterministic_default = difference is None
    if difference is not None:
        with _deterministic_algorithms():
            try:
                strict = _twice_differs(kernel, module, params, x, upstream, seed)
            except RuntimeError as e:  # an op with no deterministic implementation
                strict = f"{difference}; no deterministic mode: {str(e).splitlines()[0][:200]}"
        if strict is not None:
            raise GateFailure("determinism", strict)
    module.zero_grad(set_to_none=True)
    return {"deterministic_default_mode": float(deterministic_default)}


def _twice_differs(kernel, module, params: dict, x, upstream, seed: int) -> str | None:
    """Why two forward+backward runs from one seed differ, or None when they are identical."""
    import torch

    runs = []
    for _ in range(2):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = kernel(x)
        out.backward(upstream)
        runs.append((out.detach().clone(),
                     {n: p.grad.detach().clone() for n, p in params.items()}))
    (out_a, grads_a), (out_b, grads_b) = runs
    if not torch.equal(out_a, out_b):
        return ("the output differs between two runs with the same seed "
                f"(max |diff| {_max_diff(out_a, out_b):.3g})")
    for name in params:
        if not torch.equal(grads_a[name], grads_b[name]):
            return (f"the gradient of {name} differs between two runs with the same seed "
                    f"(max |diff| {_max_diff(grads_a[name], grads_b[name]):.3g})")
    return None


@contextmanager
def _deterministic_algorithms():
    """torch's deterministic mode (and cuDNN's), restored afterwards."""
    import torch

    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def _check_grads(params: dict, *, step: int) -> None:
    import torch

    for name, p in params.items():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise GateFailure("finite_gradient", f"{_count_bad(p.grad)} non-finite values in the "
                                                 f"gradient of {name} at step {step}")


def _count_bad(t) -> int:
    import torch

    return int((~torch.isfinite(t)).sum().item())


def _max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max().item())


# Stage 2 ----------------------------------------------------------------------------------------

def profile(kernel, module, interface, form: str, dtype, job: GauntletJob, *,
            notes: dict[str, str] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Stage 2 on `kernel`: the metrics of the report, and the comparison with the eager module.
    `notes` (the report's hardware context) receives how each latency was timed and, where a
    CUDA graph could not be captured, why."""
    import copy

    import torch

    device = job.device
    g = torch.Generator(device="cpu").manual_seed(job.seed + 1)
    x_shape = input_shape(form, interface.in_features, profile=True)
    x = torch.randn(x_shape, generator=g).to(device=device, dtype=dtype)
    upstream = torch.randn(output_shape(interface, x_shape), generator=g).to(device=device,
                                                                             dtype=dtype)
    module.train()
    positions = math.prod(x_shape[:-1]) if form != "maps" else x_shape[0] * x_shape[2] * x_shape[3]

    def forward():
        return kernel(x)

    def train_step():
        kernel(x).backward(upstream)

    notes = {} if notes is None else notes
    fwd = _measure(forward, job, notes, "latency")
    module.zero_grad(set_to_none=True)
    step = _measure(train_step, job, notes, "train_step",
                    before_capture=lambda: module.zero_grad(set_to_none=True))
    module.zero_grad(set_to_none=True)
    memory_mb, memory_method = _peak_memory_mb(kernel, module, x, upstream, device)

    # Precision drift against float64, on CPU (float64 is slow or absent on some GPUs).
    reference = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
    torch.manual_seed(job.seed)
    with torch.no_grad():
        y = kernel(x).detach().to("cpu", torch.float64)
    torch.manual_seed(job.seed)
    with torch.no_grad():
        y64 = reference(x.to("cpu", torch.float64))
    scale = float(y64.abs().max().item())
    drift = float((y - y64).abs().max().item()) / scale if scale > 0 else 0.0
    if not math.isfinite(drift):
        raise GateFailure("finite_output", "non-finite output at profiling size")

    params = sum(p.numel() for p in module.parameters())
    metrics = {
        LATENCY_MS: fwd["mean"], "latency_ms_p50": fwd["p50"], "latency_ms_p99": fwd["p99"],
        "latency_cv_pct": fwd["cv_pct"], "latency_spread_pct": fwd["spread_pct"],
        "latency_cuda_graph": fwd["cuda_graph"],
        "train_step_ms_mean": step["mean"], "train_step_ms_p50": step["p50"],
        "train_step_ms_p99": step["p99"], "train_step_cv_pct": step["cv_pct"],
        "train_step_spread_pct": step["spread_pct"], "train_step_cuda_graph": step["cuda_graph"],
        "throughput_calls_per_s": 1000.0 / fwd["mean"] if fwd["mean"] > 0 else 0.0,
        "throughput_positions_per_s": positions * 1000.0 / fwd["mean"] if fwd["mean"] > 0 else 0.0,
        MEMORY_MB: memory_mb, "memory_accounting_tensor_bytes": float(memory_method == "tensors"),
        "param_count": float(params), "positions": float(positions),
        "precision_drift_vs_fp64": drift, "timed_calls": float(fwd["calls"]),
    }
    baseline: dict[str, float] = {}
    if getattr(kernel, "compiled", None) is not None:
        eager = _measure(lambda: module(x), job, notes, "eager")
        baseline = {"eager_latency_ms_mean": eager["mean"], "eager_latency_ms_p50": eager["p50"],
                    "eager_cuda_graph": eager["cuda_graph"],
                    "speedup_vs_eager": eager["mean"] / fwd["mean"] if fwd["mean"] > 0 else 0.0,
                    "latency_change_pct_vs_eager":
                        100.0 * (fwd["mean"] - eager["mean"]) / eager["mean"]}
        if kernel.compiled.compiled_calls == 0:
            baseline["compiled_path_used"] = 0.0
    else:
        baseline = {"speedup_vs_eager": 1.0, "latency_change_pct_vs_eager": 0.0}
    return metrics, baseline


def _measure(fn, job: GauntletJob, notes: dict[str, str], name: str, *,
             before_capture=None) -> dict[str, float]:
    """Time `fn` as a CUDA graph replay on a GPU, else (CPU, `cuda_graphs` off, or a capture that
    fails) per call. Records the method in the result (`cuda_graph`) and in `notes`."""
    if job.device.startswith("cuda") and job.cuda_graphs:
        try:
            timing = _time_cuda_graph(fn, job, before_capture=before_capture)
        except Exception as e:  # noqa: BLE001 - capture refused (a host sync inside the call...)
            notes[f"{name}_graph_failure"] = " ".join(str(e).split())[:200]
            _recover_from_capture()
        else:
            notes[f"{name}_timing"] = "cuda_graph_replay"
            return timing
    timing = _time(fn, job)
    notes[f"{name}_timing"] = ("cuda_events_per_call" if job.device.startswith("cuda")
                               else "perf_counter_per_call")
    return timing


def _time_cuda_graph(fn, job: GauntletJob, *, before_capture=None) -> dict[str, float]:
    """GPU time per call of `fn`, launch overhead excluded: `graph_calls` calls captured as one
    CUDA graph, replayed back to back in `rounds` repeats of ~`round_seconds`; an event pair
    around each repeat. Milliseconds; p50/p99/cv/spread are over the repeats' means."""
    import torch

    # Warm-up on a side stream (torch.cuda.graphs: lazy initialisation, cuBLAS workspaces and
    # autograd's first-call work must not be captured).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(job.warmup_calls, 3)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if before_capture is not None:
        before_capture()  # gradients set to None: backward allocates them in the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(job.graph_calls):
            fn()
    # Replay warm-up, timed: its time per replay sizes the repeats.
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays, spent_ms = 0, 0.0
    while replays < 3 or spent_ms < 1000.0 * job.warmup_seconds:
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        spent_ms += begin.elapsed_time(end)
        replays += 1
    per_replay_ms = max(spent_ms / replays, 1e-4)
    n = max(1, round(1000.0 * job.round_seconds / per_replay_ms))
    repeat_ms: list[float] = []
    for _ in range(job.rounds):
        begin.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        repeat_ms.append(begin.elapsed_time(end) / (n * job.graph_calls))
    del graph
    return _summarise(repeat_ms, calls=job.rounds * n * job.graph_calls, cuda_graph=True)


def _summarise(values: list[float], *, calls: int, cuda_graph: bool) -> dict[str, float]:
    """mean/p50/p99 of repeat means (graphs) and their CV% and spread (max-min over median)."""
    ordered = sorted(values)
    mean, median = statistics.fmean(ordered), _percentile(ordered, 50)
    spread = statistics.pstdev(ordered) if len(ordered) > 1 else 0.0
    return {"mean": mean, "p50": median, "p99": _percentile(ordered, 99),
            "cv_pct": 100.0 * spread / mean if mean > 0 else 0.0,
            "spread_pct": 100.0 * (ordered[-1] - ordered[0]) / median if median > 0 else 0.0,
            "calls": calls, "cuda_graph": float(cuda_graph)}


def _recover_from_capture() -> None:
    """After a refused capture: wait for the device and drop the graph's cached blocks, so the
    per-call fallback starts clean."""
    import torch

    try:
        torch.cuda.synchronize()
    except RuntimeError:
        pass
    torch.cuda.empty_cache()


def _time(fn, job: GauntletJob) -> dict[str, float]:
    """Time `fn` per call: warm-up excluded, then `rounds` rounds of calls. Milliseconds."""
    cuda = job.device.startswith("cuda")
    # Warm-up, timed as one batch: its mean call time (calls queued as in the rounds) sizes them.
    _sync(cuda)
    start, warmed = time.perf_counter(), 0
    while warmed < job.warmup_calls or time.perf_counter() - start < job.warmup_seconds:
        fn()
        warmed += 1
    _sync(cuda)
    estimate = max((time.perf_counter() - start) / warmed, 1e-7)
    calls = int(min(job.max_calls, max(job.min_calls, job.round_seconds / estimate)))
    samples, round_means = _rounds(fn, job.rounds, calls, cuda)
    samples.sort()
    mean = statistics.fmean(samples)
    spread = statistics.pstdev(round_means) if len(round_means) > 1 else 0.0
    rounds = sorted(round_means)
    median = _percentile(rounds, 50)
    return {"mean": mean, "p50": _percentile(samples, 50), "p99": _percentile(samples, 99),
            "cv_pct": 100.0 * spread / statistics.fmean(round_means) if mean > 0 else 0.0,
            "spread_pct": 100.0 * (rounds[-1] - rounds[0]) / median if median > 0 else 0.0,
            "calls": len(samples), "cuda_graph": 0.0}


def _rounds(fn, rounds: int, calls: int, cuda: bool) -> tuple[list[float], list[float]]:
    """`rounds` rounds of `calls` timed calls: every call's time (ms) and each round's mean."""
    import gc

    import torch

    samples: list[float] = []
    round_means: list[float] = []
    for _ in range(rounds):
        gc.collect()  # untimed: what earlier work left is not collected inside a timed call
        this_round = []
        if cuda:
            # One event pair per call, read after the round (one sync): calls queue back to
            # back as in training, and no per-call sync stretches the gaps between them.
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(calls)]
            for begin, end in events:
                begin.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            this_round = [begin.elapsed_time(end) for begin, end in events]
        else:
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                this_round.append((time.perf_counter() - t0) * 1000.0)
        samples += this_round
        round_means.append(statistics.fmean(this_round))
    return samples, round_means


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _peak_memory_mb(kernel, module, x, upstream, device: str) -> tuple[float, str]:
    """Peak memory of one forward+backward in MB, and how it was measured."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        kernel(x).backward(upstream)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - before
        module.zero_grad(set_to_none=True)
        # The parameters were allocated before the baseline: add them back.
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        return (peak + weights) / 2**20, "cuda_max_memory_allocated"
    seen: dict[int, int] = {}

    def count(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())

    def pack(t):
        count(t)
        return t

    for p in module.parameters():
        count(p)
    count(x)
    count(upstream)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = kernel(x)
    count(y)
    y.backward(upstream)
    for p in module.parameters():
        if p.grad is not None:
            count(p.grad)
    module.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20, "tensors"


def hardware_context(device: str) -> dict[str, str]:
    import torch

    context = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
               "cpu": _cpu_model(), "cpu_threads": str(torch.get_num_threads()),
               "cpu_count": str(os.cpu_count() or 0)}
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        context.update(gpu=torch.cuda.get_device_name(index).replace(" ", "_"),
                       cuda=str(torch.version.cuda))
    return context


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()[:100]
    except OSError:
        pass
    return platform.processor() or "unknown"

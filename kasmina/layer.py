"""KasminaLayer: a host module whose output is split into chunks, one seed each (DESIGN.md 10).

Forward, for active seeds s of chunk c(s):

    out[..., chunk c(s)] = host(x)[..., chunk c(s)] + alpha_s * g_s(x)

where g_s reads the host module's *input*. With no active seed the layer returns the host's
output tensor itself (bit-identical), reading telemetry from it only on sampled steps.

Control flow on the hot path never reads the device: what runs is a `_Plan` built on the host
at epoch boundaries (and when a seed fails or is disabled), from a host mirror of the control
arrays. Seed losses of TRAINING seeds are optimized from a hook on the layer output: when the
task loss's gradient reaches the output, the hook computes each seed's objective (which, for
`gradient_match`, needs that gradient) on the seed's own graph over detached inputs and
backpropagates it into the seed parameters only. So the seeds learn during the task's backward,
their gradients accumulate in their own `.grad`, and the optimizer step that Tolaria already
runs updates them, provided `seed_parameters()` is in the optimizer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn

from esper.contracts import (
    GraftingStrategy,
    HealthSignal,
    KasminaCommandType,
    KasminaControlCommand,
    KernelInterface,
    LayerKind,
    SeedLifecycle,
    SeedTransition,
    seed_id,
)
from esper.errors import BadInputError, EsperError, IllegalTransitionError
from kasmina import grafting, kernels
from kasmina.cache import KernelCache
from kasmina.config import KasminaConfig
from kasmina.lifecycle import (
    BLENDING,
    HAS_KERNEL,
    HOLDS_MODULE,
    ISOLATED,
    LOAD_FAILED,
    RETURNS_TO_DORMANT,
    RUNTIME_ERROR,
    TRAINABLE,
    check_transition,
)
from kasmina.seeds import SeedBank, regroup
from kasmina.state import (
    COUNT,
    DEAD,
    GRAD_COUNT,
    GRAD_SUMSQ,
    SUM,
    SUMSQ,
    SeedState,
    checksum,
)

assert (SUMSQ, DEAD, COUNT) == (SUM + 1, SUM + 2, SUM + 3)  # kernels.accumulate_chunk_stats' layout

S = SeedLifecycle
META_FORMAT = "kasmina.layer/1"
# (input shape, input dtype, output shape, output dtype) of one forward: what warm_up runs on.
_Shapes = tuple[tuple[int, ...], torch.dtype, tuple[int, ...], torch.dtype]
MAX_SHAPES = 8  # batch shapes remembered per layer (train, last partial batch, eval, ...)
# Stages after which a seed blends: from germination on, warm_up prepares the blend.
WARM_BLEND = frozenset({S.GERMINATED, S.LOADING, S.TRAINING}) | BLENDING


@dataclass(frozen=True)
class SeedIncident:
    """A seed's blueprint failed at run time or its kernel failed to load (HLD K.6)."""

    layer_id: int
    seed_index: int
    kernel_artifact_id: str | None
    stage: SeedLifecycle
    step: int
    error: str

    @property
    def seed_id(self) -> str:
        return seed_id(self.layer_id, self.seed_index)


@dataclass
class BoundaryReport:
    """What one epoch boundary did to a layer."""

    layer_id: int
    epoch: int
    transitions: list[SeedTransition] = field(default_factory=list)
    rejected: list[tuple[KasminaControlCommand, str]] = field(default_factory=list)
    incidents: list[SeedIncident] = field(default_factory=list)
    rollback_requested: str | None = None

    @property
    def optimizer_rebuild_required(self) -> bool:
        """Seed parameters were created, moved between stages or removed."""
        return any((t.from_stage in HOLDS_MODULE) or (t.to_stage in HOLDS_MODULE)
                   for t in self.transitions)


@dataclass
class _Plan:
    """What the forward runs, decided on the host."""

    blending: list[SeedBank]
    keep: list[torch.Tensor | None]   # per blending bank: rows of its output still blended
    training: list[SeedBank]
    chunk_slot: torch.Tensor          # (C,) int32
    slot_chunk: torch.Tensor          # (A,) int64
    grafting: list[tuple[GraftingStrategy, torch.Tensor, torch.Tensor]]  # strategy, chunks, slots

    @property
    def idle(self) -> bool:
        return not self.blending and not self.training


class KasminaLayer(nn.Module):
    """A host module with `seeds` seeds on its output features (linear) or channels (conv2d).

    `interface` is the host's own interface: kind, input width, output width, stride.
    """

    def __init__(self, host: nn.Module, interface: KernelInterface, seeds: int, *,
                 layer_id: int = 0, layer_name: str = "", config: KasminaConfig | None = None,
                 cache: KernelCache | None = None) -> None:
        super().__init__()
        if seeds <= 0 or interface.out_features % seeds:
            raise BadInputError(
                f"layer {layer_name or layer_id}: {interface.out_features} output "
                f"{'channels' if interface.kind is LayerKind.CONV2D else 'features'} do not split "
                f"into {seeds} equal chunks (set seeds_per_layer or chunk_width to a divisor)")
        self.host = host
        self.interface = interface
        self.seeds = seeds
        self.chunk_width = interface.out_features // seeds
        self.seed_interface = KernelInterface(kind=interface.kind, in_features=interface.in_features,
                                              out_features=self.chunk_width, stride=interface.stride)
        self.layer_id = layer_id
        self.layer_name = layer_name
        self.config = config or KasminaConfig()
        # Stages whose seed parameters the optimizer trains (FOSSILIZED too with train_fossils).
        self._trainable = TRAINABLE | {S.FOSSILIZED} if self.config.train_fossils else TRAINABLE
        self.cache = cache
        device = _device_of(host)
        self.state = SeedState(seeds).to(device)
        self.banks = nn.ModuleDict()
        self.register_buffer("meta", torch.zeros(0, dtype=torch.uint8, device=device))
        self._probe = kernels.new_probe(seeds, device)
        self._control = self.state.empty_control()   # host mirror of the control arrays
        self._kernel_table: list[str] = []
        self._templates: dict[str, nn.Module] = {}
        self._loads: dict[int, Future] = {}
        self._pending: list[KasminaControlCommand] = []
        self._incidents: list[SeedIncident] = []
        self._incidents_reported = 0
        self._failed: dict[int, str] = {}             # chunk -> error, until the next boundary
        self._disabled: frozenset[int] = frozenset()
        # The task loss EMA of performance_linked grafting (NaN until the first loss is seen).
        self.register_buffer("loss_ema", torch.full((), float("nan"), device=device))
        self._step = 0
        self._epoch = 0
        self._shapes: dict[_Shapes, None] = {}       # input and output shapes seen by forward
        self._warmed: set[tuple] = set()              # what warm_up has run, by shape
        self.rollback_requested: str | None = None
        self._plan = self._build_plan()
        self.register_load_state_dict_post_hook(_after_load)

    # --- stages ------------------------------------------------------------------------------

    def stage(self, seed: int) -> SeedLifecycle:
        return S.from_code(int(self._control["lifecycle"][seed]))

    @property
    def stages(self) -> list[SeedLifecycle]:
        return [S.from_code(int(c)) for c in self._control["lifecycle"]]

    def kernel_of(self, seed: int) -> str | None:
        slot = int(self._control["kernel_slot"][seed])
        return self._kernel_table[slot] if slot >= 0 else None

    @property
    def incidents(self) -> list[SeedIncident]:
        return list(self._incidents)

    def drain_incidents(self) -> list[SeedIncident]:
        incidents, self._incidents = self._incidents, []
        self._incidents_reported = 0
        return incidents

    # --- optimizer-facing parameters ---------------------------------------------------------

    def seed_parameters(self, stage: SeedLifecycle | None = None) -> list[nn.Parameter]:
        """Seed parameters an optimizer should train now (stage None), or those of `stage`."""
        wanted = self._trainable if stage is None else {stage}
        return [p for bank in self.banks.values() if bank.stage in wanted for p in bank.parameters()]

    def parameter_groups(self) -> dict[SeedLifecycle, list[nn.Parameter]]:
        groups: dict[SeedLifecycle, list[nn.Parameter]] = {}
        for bank in self.banks.values():
            groups.setdefault(bank.stage, []).extend(bank.parameters())
        return groups

    def host_parameters(self) -> list[nn.Parameter]:
        return list(self.host.parameters())

    # --- commands and boundaries -------------------------------------------------------------

    def queue(self, command: KasminaControlCommand) -> None:
        """Queue a controller command; it is applied at the next `on_epoch_end`."""
        if command.target_layer_id != self.layer_id:
            raise BadInputError(f"command {command.command_id} targets layer "
                                f"{command.target_layer_id}, not layer {self.layer_id}")
        if not 0 <= command.target_seed_id < self.seeds:
            raise BadInputError(f"command {command.command_id}: layer {self.layer_id} has no seed "
                                f"{command.target_seed_id} (it has {self.seeds})")
        self._pending.append(command)

    @property
    def pending(self) -> list[KasminaControlCommand]:
        return list(self._pending)

    def on_epoch_end(self, epoch: int | None = None, run_id: str = "") -> BoundaryReport:
        """The epoch boundary: check the state, apply automatic and commanded transitions
        atomically, rebuild the seed banks and the forward plan.

        Automatic transitions: CULLED and CANCELLED return to DORMANT; a seed whose blueprint
        failed at run time is culled; a LOADING seed whose load finished goes on to TRAINING
        (GRAFTING for a kernel without parameters) or, if the load failed, is culled. After the
        commands, a seed still GERMINATED since an earlier boundary whose load (started at
        germination) failed is culled too, through LOADING (GERMINATED -> CULLED is not in the
        table): the controller sees CULLED, the load error as an incident and the embargo, not a
        seed that stays GERMINATED and never ready."""
        self._epoch = self._epoch + 1 if epoch is None else epoch
        report = BoundaryReport(self.layer_id, self._epoch)
        corrupt = self.verify_state()
        if corrupt:
            self.rollback_requested = report.rollback_requested = corrupt
            return report
        self._fold_probe()
        control = {k: v.copy() for k, v in self._control.items()}
        moved: set[int] = set()

        def move(seed: int, target: SeedLifecycle, reason: str, **kw) -> None:
            self._move(control, seed, target, reason, report, run_id, **kw)
            moved.add(seed)

        control["embargo"] = np.maximum(control["embargo"] - 1, 0).astype(np.int32)
        for seed, error in sorted(self._failed.items()):
            if S.CULLED in _allowed(self._stage_in(control, seed)):
                move(seed, S.CULLED, f"{RUNTIME_ERROR}: {error}")
        for seed in range(self.seeds):
            stage = self._stage_in(control, seed)
            if stage in RETURNS_TO_DORMANT and seed not in moved:
                move(seed, S.DORMANT, f"discard after {stage.value}")
            elif stage is S.LOADING and seed not in moved and self._load_done(seed):
                self._finish_loading(control, seed, move, report)
        for command in self._pending:
            try:
                self._apply_command(control, command, move)
            except (IllegalTransitionError, BadInputError) as e:
                report.rejected.append((command, str(e)))
        self._pending = []
        for seed in range(self.seeds):
            if (seed not in moved and self._stage_in(control, seed) is S.GERMINATED
                    and self._load_failed(seed)):
                # Germinated at an earlier boundary, not advanced or cancelled by this one's
                # commands, and its load has failed: it could never become ready. GERMINATED ->
                # CULLED is not in the table, so it goes the way of a failure in LOADING.
                move(seed, S.LOADING, "its kernel load failed")
                self._finish_loading(control, seed, move, report)
        for seed in range(self.seeds):
            if seed not in moved:
                control["epochs_in_stage"][seed] += 1
        if self.config.grafting.ramp_unit == "epoch":
            self._ramp_alpha(self._plan.grafting, per_epoch=True)
        self._commit(control, moved)
        report.incidents = self._incidents[self._incidents_reported:]
        self._incidents_reported = len(self._incidents)
        self.warm_up()
        return report

    def transition(self, seed: int, target: SeedLifecycle, *, kernel_artifact_id: str | None = None,
                   strategy: GraftingStrategy = GraftingStrategy.FIXED_RAMP, reason: str = "",
                   run_id: str = "") -> SeedTransition:
        """Move one seed now (Tolaria's rollback marking, tests). Raises IllegalTransitionError
        when the table forbids it. LOADING -> TRAINING/GRAFTING waits for the kernel load."""
        control = {k: v.copy() for k, v in self._control.items()}
        report = BoundaryReport(self.layer_id, self._epoch)
        if self._stage_in(control, seed) is S.LOADING and target in (S.TRAINING, S.GRAFTING):
            self._template_for(seed)  # wait for the load; raises its error
        self._move(control, seed, target, reason, report, run_id,
                   kernel_artifact_id=kernel_artifact_id, strategy=strategy)
        self._commit(control, {seed})
        return report.transitions[-1]

    def wait_for_loads(self, timeout: float | None = None) -> None:
        """Block until every kernel load in flight has finished (tests, benchmarks)."""
        for future in list(self._loads.values()):
            try:
                future.result(timeout)
            except Exception:  # noqa: BLE001 - a failed load is handled at the boundary
                pass

    def verify_state(self) -> str | None:
        """A reason when the device state is corrupt (checksum, codes, or host mirror differ)."""
        control, stored = self.state.read_control()
        if checksum(control) != stored:
            return f"layer {self.layer_id}: seed state checksum mismatch"
        if int(control["lifecycle"].max(initial=0)) >= len(S):
            return f"layer {self.layer_id}: invalid lifecycle code in seed state"
        if any(not np.array_equal(control[k], self._control[k]) for k in control):
            return f"layer {self.layer_id}: seed state differs from its last committed value"
        return None

    def _stage_in(self, control: dict[str, np.ndarray], seed: int) -> SeedLifecycle:
        return S.from_code(int(control["lifecycle"][seed]))

    def _apply_command(self, control, command: KasminaControlCommand, move) -> None:
        seed = command.target_seed_id
        kind = command.command
        if kind is KasminaCommandType.REQUEST_GERMINATION:
            if control["embargo"][seed] > 0:
                raise BadInputError(f"seed {seed_id(self.layer_id, seed)} is under embargo for "
                                    f"{int(control['embargo'][seed])} more epoch(s)")
            move(seed, S.GERMINATED, command.reason, kernel_artifact_id=command.kernel_artifact_id,
                 strategy=command.grafting_strategy)
        elif kind is KasminaCommandType.CANCEL_GERMINATION:
            move(seed, S.CANCELLED, command.reason)
        elif kind is KasminaCommandType.CULL:
            move(seed, S.CULLED, command.reason)
        else:
            target = command.target_stage
            if target is S.GRAFTING and self._stage_in(control, seed) is S.TRAINING:
                move(seed, target, command.reason, strategy=command.grafting_strategy)
            else:
                move(seed, target, command.reason)

    def _move(self, control, seed: int, target: SeedLifecycle, reason: str, report: BoundaryReport,
              run_id: str, *, kernel_artifact_id: str | None = None,
              strategy: GraftingStrategy | None = None) -> None:
        current = self._stage_in(control, seed)
        check_transition(seed_id(self.layer_id, seed), current, target)
        kernel = self._kernel_table[control["kernel_slot"][seed]] if control["kernel_slot"][seed] >= 0 else None
        if target is S.GERMINATED:
            if kernel_artifact_id is None:
                raise BadInputError(f"seed {seed_id(self.layer_id, seed)}: germination needs a "
                                    "kernel_artifact_id")
            if kernel_artifact_id not in self._kernel_table:
                self._kernel_table.append(kernel_artifact_id)
            control["kernel_slot"][seed] = self._kernel_table.index(kernel_artifact_id)
            kernel = kernel_artifact_id
            self._start_load(seed, kernel_artifact_id)
        if strategy is not None:
            control["strategy"][seed] = grafting.STRATEGIES.index(strategy)
        if target not in HAS_KERNEL:
            control["kernel_slot"][seed] = -1
            self._loads.pop(seed, None)
        if target is S.CULLED:
            control["embargo"][seed] = self.config.embargo_epochs
        control["lifecycle"][seed] = target.code
        control["epochs_in_stage"][seed] = 0
        control["stage_entry_step"][seed] = self._step
        report.transitions.append(SeedTransition(
            run_id=run_id, seed_id=seed_id(self.layer_id, seed), epoch=self._epoch,
            from_stage=current, to_stage=target, kernel_artifact_id=kernel, reason=reason))

    def _start_load(self, seed: int, kernel_artifact_id: str) -> None:
        if self.cache is None:
            future: Future = Future()
            future.set_exception(EsperError("no kernel source attached to this model "
                                            "(kasmina.attach_kernel_source)"))
        else:
            future = self.cache.prefetch(kernel_artifact_id, self.state.alpha.device)
        self._loads[seed] = future

    def _load_done(self, seed: int) -> bool:
        future = self._loads.get(seed)
        return future is not None and future.done()

    def _load_failed(self, seed: int) -> bool:
        future = self._loads.get(seed)
        return future is not None and future.done() and future.exception() is not None

    def _template_for(self, seed: int) -> nn.Module:
        kernel = self.kernel_of(seed)
        future = self._loads.get(seed)
        module = future.result() if future is not None else self._fetch(kernel)
        interface = getattr(module, "interface", None)
        if isinstance(interface, KernelInterface) and interface != self.seed_interface:
            raise BadInputError(f"kernel {kernel} has interface {interface}, the seed needs "
                                f"{self.seed_interface}")
        self._templates[kernel] = module
        return module

    def _fetch(self, kernel: str) -> nn.Module:
        if kernel in self._templates:
            return self._templates[kernel]
        if self.cache is None:
            raise EsperError(f"kernel {kernel} is needed but no kernel source is attached "
                             "(kasmina.attach_kernel_source)")
        return self.cache.get(kernel, self.state.alpha.device)

    def _finish_loading(self, control, seed: int, move, report: BoundaryReport) -> None:
        kernel = self._kernel_table[control["kernel_slot"][seed]]
        try:
            module = self._template_for(seed)
        except Exception as e:  # noqa: BLE001 - any load failure culls the seed (HLD B.2)
            self._record_incident(seed, kernel, S.LOADING, f"load failed: {e}")
            move(seed, S.CULLED, f"{LOAD_FAILED}: {e}")
            return
        trainable = any(p.requires_grad for p in module.parameters())
        move(seed, S.TRAINING if trainable else S.GRAFTING, "kernel loaded")

    def _record_incident(self, seed: int, kernel: str | None, stage: SeedLifecycle, error: str) -> None:
        self._incidents.append(SeedIncident(self.layer_id, seed, kernel, stage, self._step, error))

    def _commit(self, control: dict[str, np.ndarray], moved: set[int]) -> None:
        """Make `control` the layer's state: rebuild banks, reset per-stage arrays, sync, plan."""
        previous = self._control
        self._rebuild_banks(previous, control)
        moved_list = sorted(moved)
        if moved_list:
            idx = torch.tensor(moved_list, dtype=torch.long, device=self.state.alpha.device)
            stages = [S.from_code(int(control["lifecycle"][s])) for s in moved_list]
            keep_alpha = torch.tensor([st in BLENDING and st is not S.GRAFTING for st in stages],
                                      device=idx.device)
            self.state.alpha[idx] = torch.where(keep_alpha, self.state.alpha[idx], 0.0)
            self.state.graft_ref[idx] = float("nan")
            self.state.graft_signal[idx] = float("nan")
            entered_training = torch.tensor([st is S.TRAINING for st in stages], device=idx.device)
            self.state.seed_loss[idx] = torch.where(entered_training[:, None], float("nan"),
                                                    self.state.seed_loss[idx])
        for seed in moved:
            self._failed.pop(seed, None)
        self._failed = {s: e for s, e in self._failed.items()
                        if S.from_code(int(control["lifecycle"][s])) in HOLDS_MODULE}
        self._control = control
        self.state.write_control(control)
        self._plan = self._build_plan()

    def _rebuild_banks(self, previous: dict[str, np.ndarray], control: dict[str, np.ndarray]) -> None:
        """Regroup seeds into banks by (stage, kernel): stacked weights follow their seeds."""
        wanted: dict[str, tuple[SeedLifecycle, int, list[int]]] = {}
        for seed in range(self.seeds):
            stage = S.from_code(int(control["lifecycle"][seed]))
            if stage in HOLDS_MODULE:
                slot = int(control["kernel_slot"][seed])
                wanted.setdefault(_bank_name(stage, slot), (stage, slot, []))[2].append(seed)
        old = dict(self.banks.items())
        if {k: v[2] for k, v in wanted.items()} == {k: b.chunks for k, b in old.items()}:
            return
        device, dtype = self.state.alpha.device, _dtype_of(self.host)
        new = nn.ModuleDict()
        for name, (stage, slot, chunks) in sorted(wanted.items()):
            kernel = self._kernel_table[slot]
            trainable = stage in self._trainable
            if name in old and old[name].chunks == chunks:
                bank = old[name]
                for p in bank.parameters():
                    p.requires_grad_(trainable)
                new[name] = bank
                continue
            template = self._templates.get(kernel)
            if template is None:
                template = self._fetch(kernel)
            self._templates[kernel] = template
            sources = [b for b in old.values() if b.kernel_artifact_id == kernel]
            held = {c for b in sources for c in b.chunks}
            fresh = SeedBank.fresh(template, kernel, stage, chunks, dtype, device, trainable)
            if held & set(chunks):
                carried = regroup(sources, [c for c in chunks if c in held])
                rows = [i for i, c in enumerate(chunks) if c in held]
                state = fresh.seed_state()
                with torch.no_grad():
                    for key, value in carried.items():
                        state[key][rows] = value.to(state[key].dtype)
            new[name] = fresh
        self.banks = new

    # --- forward -----------------------------------------------------------------------------

    def _build_plan(self) -> _Plan:
        device = self.state.alpha.device
        blending, keep, training, slot_chunk = [], [], [], []
        grafting_chunks: dict[GraftingStrategy, list[tuple[int, int]]] = {}
        for bank in self.banks.values():
            if any(c in self._failed for c in bank.chunks):
                continue
            if bank.stage in ISOLATED:
                training.append(bank)
            elif bank.stage in BLENDING:
                rows = [i for i, c in enumerate(bank.chunks) if c not in self._disabled]
                if not rows:
                    continue
                keep.append(None if len(rows) == bank.size else
                            torch.tensor(rows, dtype=torch.long, device=device))
                for i in rows:
                    chunk = bank.chunks[i]
                    if bank.stage is S.GRAFTING:
                        strategy = grafting.STRATEGIES[int(self._control["strategy"][chunk])]
                        grafting_chunks.setdefault(strategy, []).append((chunk, len(slot_chunk)))
                    slot_chunk.append(chunk)
                blending.append(bank)
        chunk_slot = torch.full((self.seeds,), -1, dtype=torch.int32)
        chunk_slot[slot_chunk] = torch.arange(len(slot_chunk), dtype=torch.int32)
        groups = [(strategy, torch.tensor([c for c, _ in pairs], device=device),
                   torch.tensor([s for _, s in pairs], device=device))
                  for strategy, pairs in grafting_chunks.items()]
        return _Plan(blending, keep, training, chunk_slot.to(device),
                     torch.tensor(slot_chunk, dtype=torch.long, device=device), groups)

    def _rows(self, y: torch.Tensor) -> torch.Tensor:
        """(rows, F): chunk c is columns [c * L, (c + 1) * L) of every row."""
        if self.interface.kind is LayerKind.CONV2D:
            return y.reshape(y.shape[0], -1)  # (batch, channels * H * W)
        return y.reshape(-1, y.shape[-1])     # (leading dims, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.host(x)
        shapes = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
        if shapes not in self._shapes and len(self._shapes) < MAX_SHAPES:
            self._shapes[shapes] = None  # for warm_up: the batch shapes this layer runs
        learning = self.training and torch.is_grad_enabled()
        if self.training:
            self._step += 1
        plan = self._plan
        if plan.idle:
            return self._sampled_telemetry(y) if self.training else y

        # Isolated TRAINING seeds: their own graph over detached inputs; trained from the hook.
        isolated = []
        if learning and plan.training:
            x_detached = x.detach()
            for bank in plan.training:
                g = self._run_bank(bank, x_detached)
                if g is not None:
                    isolated.append((bank, g))
            plan = self._plan  # a failing bank rebuilds the plan

        outputs = [(bank, self._run_bank(bank, x)) for bank in plan.blending]
        if any(g is None for _, g in outputs):
            plan = self._plan
            outputs = [(bank, g) for bank, g in outputs if g is not None and bank in plan.blending]
        if not outputs:
            out = self._sampled_telemetry(y) if self.training else y
        else:
            out = self._blend(y, plan, outputs, learning)
        if isolated and not out.requires_grad:
            out = out.detach().requires_grad_()  # a frozen host: the seeds still learn from its gradient
        if isolated:
            out.register_hook(partial(self._train_isolated, isolated, y.detach()))
        return out

    def _run_bank(self, bank: SeedBank, x: torch.Tensor) -> torch.Tensor | None:
        """The bank's (A, rows, L) output, or None after isolating a failure (HLD K.6)."""
        try:
            g = bank(x)
            rows = x.shape[0] if self.interface.kind is LayerKind.CONV2D else math.prod(x.shape[:-1])
            return g.reshape(bank.size, rows, -1)
        except Exception as e:  # noqa: BLE001 - one seed never halts the run
            for chunk in bank.chunks:
                self._failed[chunk] = f"{type(e).__name__}: {e}"
                self._record_incident(chunk, bank.kernel_artifact_id, bank.stage,
                                      f"{type(e).__name__}: {e}")
            if self.cache is not None:
                self.cache.evict(bank.kernel_artifact_id)
            self._templates.pop(bank.kernel_artifact_id, None)
            self._plan = self._build_plan()
            return None

    # --- warm-up -------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Pay, at the epoch boundary, the first-call costs that the coming epochs' steps would
        otherwise pay inside a step (DESIGN.md 16: no step during germination above 1.2x the
        median), for every batch shape the layer has run:

        - once a seed is GERMINATED (or later in its growth), the blend's forward and backward
          on scratch tensors: on CUDA, Triton compiles those kernel variants on their first
          launch, ~1 s in the first GRAFTING step on an H100 (docs/bench-train.md); the kernels
          depend on the layer's shape and dtype, not on the seed's blueprint;
        - for each seed bank, one forward and backward of its kernel (`SeedBank.warm_up`):
          torch.func's first vmap and the blueprint's GEMM shapes (~180 ms in the first
          TRAINING step on the H100).

        Called by `on_epoch_end` (after the banks are rebuilt) and by Tolaria after a restore.
        Changes nothing but caches: scratch inputs, no telemetry, no `.grad`, the RNG state put
        back. Each (what, shape) runs once per layer; a failure here is left to the real forward,
        which isolates a failing seed."""
        if not self._shapes or torch.is_inference_mode_enabled():
            return
        stages = self.stages
        growing = [s for s in range(self.seeds) if stages[s] in WARM_BLEND]
        banks = list(self.banks.values())
        todo = [shapes for shapes in self._shapes
                if (growing and ("blend", shapes) not in self._warmed)
                or any(_bank_key(b, shapes) not in self._warmed for b in banks)]
        if not todo:
            return
        device = self.state.alpha.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                   device_type=device.type if device.type == "cuda" else "cuda"):
            for shapes in todo:
                if growing and ("blend", shapes) not in self._warmed:
                    self._warmed.add(("blend", shapes))
                    self._warm_blend(shapes, growing)
                for bank in banks:
                    key = _bank_key(bank, shapes)
                    if key in self._warmed:
                        continue
                    self._warmed.add(key)
                    x_shape, x_dtype = shapes[0], shapes[1]
                    objective = (partial(self._warm_objective, bank, shapes)
                                 if bank.stage in ISOLATED else None)
                    try:
                        bank.warm_up(torch.ones(x_shape, dtype=x_dtype, device=device),
                                     input_grad=bank.stage in BLENDING, objective=objective)
                    except Exception:  # noqa: BLE001, S112 - the step's own forward isolates it (HLD K.6)
                        continue

    def _warm_objective(self, bank: SeedBank, shapes: _Shapes, g: torch.Tensor) -> torch.Tensor:
        """A TRAINING bank's isolated objective (`_train_isolated`) on zeros of the layer's output
        and gradient, its loss recorded into a scratch copy of the seed-loss state."""
        _, _, y_shape, y_dtype = shapes
        y = torch.zeros(y_shape, dtype=y_dtype, device=g.device)
        y3 = self._rows(y).unflatten(1, (self.seeds, -1))
        g = g.reshape(bank.size, y3.shape[0], -1)
        losses, energy = self._seed_losses(bank, g, y3, torch.ones_like(y3))
        self._record_seed_loss(bank.chunk_index, losses.detach(), energy, self.state.seed_loss.clone())
        return losses.sum()

    def _warm_blend(self, shapes: _Shapes, seeds: list[int]) -> None:
        """The blend of `_blend` (forward with the telemetry probe and backward, then the
        evaluation's forward) on zeros of the layer's shapes, with `seeds` blending, and the
        alpha ramps of their grafting strategies on scratch alphas."""
        _, _, y_shape, y_dtype = shapes
        device = self.state.alpha.device
        rows = y_shape[0] if self.interface.kind is LayerKind.CONV2D else math.prod(y_shape[:-1])
        features = math.prod(y_shape) // max(rows, 1)
        active = len(seeds)
        y2 = torch.zeros(rows, features, dtype=y_dtype, device=device, requires_grad=True)
        g = torch.zeros(active, rows, features // self.seeds, dtype=y_dtype, device=device,
                        requires_grad=True)
        chunk_slot = torch.full((self.seeds,), -1, dtype=torch.int32)
        chunk_slot[:active] = torch.arange(active, dtype=torch.int32)
        slot_chunk = torch.arange(active, dtype=torch.long, device=device)
        slot_alpha = torch.zeros(self.seeds, dtype=self.state.alpha.dtype, device=device)
        probe = kernels.new_probe(self.seeds, device)
        with torch.enable_grad():
            out, _ = kernels.blend_chunks(y2, g, slot_alpha.index_select(0, slot_chunk),
                                          chunk_slot.to(device), slot_chunk, probe,
                                          self.config.telemetry.dead_threshold)
            torch.autograd.grad(out, [y2, g, probe], grad_outputs=torch.ones_like(out))
        with torch.no_grad():
            kernels.blend_chunks(y2.detach(), g.detach(), slot_alpha.index_select(0, slot_chunk),
                                 chunk_slot.to(device), slot_chunk, None,
                                 self.config.telemetry.dead_threshold)
        nan = torch.full_like(slot_alpha, float("nan"))
        for strategy in {grafting.STRATEGIES[int(self._control["strategy"][s])] for s in seeds}:
            grafting.ramp(strategy, slot_alpha, self.config.grafting,
                          loss=torch.zeros((), device=device), reference=nan, signal=nan)

    def _blend(self, y: torch.Tensor, plan: _Plan, outputs, learning: bool) -> torch.Tensor:
        y2 = self._rows(y)
        parts = []
        for (bank, g), keep in zip(outputs, plan.keep):
            parts.append(g if keep is None else g.index_select(0, keep))
        g = parts[0] if len(parts) == 1 else torch.cat(parts)  # (A, rows, L)
        if learning and plan.grafting and self.config.grafting.ramp_unit == "step":
            self._ramp_alpha(plan.grafting, per_epoch=False)
        slot_alpha = self.state.alpha.index_select(0, plan.slot_chunk)
        telemetry = self.config.telemetry.enabled and self.training
        probe = self._probe if telemetry else None
        out2, stats = kernels.blend_chunks(y2, g.to(y2.dtype), slot_alpha, plan.chunk_slot,
                                           plan.slot_chunk, probe, self.config.telemetry.dead_threshold)
        stats = stats.detach()  # telemetry is not part of the graph
        if telemetry:  # in place on views: `health[...] += ` would also copy each view onto itself
            self.state.health[:, SUM:COUNT].add_(stats)
            self.state.health[:, COUNT].add_(y2.numel() // self.seeds)
        if learning and plan.grafting:
            self._measure_grafting(plan, g.detach(), stats)
        out = out2.view(y.shape)
        if learning and out.requires_grad and any(s is GraftingStrategy.GRAD_NORM_GATED
                                                  for s, _, _ in plan.grafting):
            out.register_hook(partial(self._measure_gradient, plan))
        return out

    def _sampled_telemetry(self, y: torch.Tensor) -> torch.Tensor:
        """Dormant telemetry: every k-th training step, on an evenly strided row sample."""
        config = self.config.telemetry
        if not config.enabled or self._step % config.every:
            return y
        y2 = self._rows(y)
        rows = y2.shape[0]
        row_step = max(1, math.ceil(rows / config.max_rows)) if config.max_rows else 1
        with torch.no_grad():  # health[:, SUM:COUNT] += the sampled stats; health[:, COUNT] += count
            kernels.accumulate_chunk_stats(y2.detach(), self.seeds, row_step, config.dead_threshold,
                                           self.state.health, SUM,
                                           math.ceil(rows / row_step) * (y2.shape[1] // self.seeds))
        if y.requires_grad and torch.is_grad_enabled():
            return kernels.GradientProbe.apply(y2, self._probe, self.seeds, row_step).view(y.shape)
        return y

    def _train_isolated(self, isolated, y: torch.Tensor, grad: torch.Tensor) -> None:
        """Output hook: each TRAINING seed's objective, backpropagated into its own weights."""
        y3 = self._rows(y).unflatten(1, (self.seeds, -1))        # (rows, chunks, L)
        # (rows, chunks, L); only gradient_match reads it
        grad3 = (self._rows(grad).unflatten(1, (self.seeds, -1))
                 if self.config.training.objective == "gradient_match" else None)
        with torch.enable_grad():
            for bank, g in isolated:
                losses, energy = self._seed_losses(bank, g, y3, grad3)
                params = [p for p in bank.parameters() if p.requires_grad]
                if params:
                    torch.autograd.backward(losses.sum(), inputs=params)
                self._record_seed_loss(bank.chunk_index, losses.detach(), energy)

    def _seed_losses(self, bank: SeedBank, g: torch.Tensor, y3: torch.Tensor,
                     grad3: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A,) the TRAINING objective of the bank's seeds: g (A, rows, L) against their chunks
        of the host output y3 (rows, chunks, L), or of its gradient grad3; and (A,) the target's
        energy, the loss a seed that outputs zero would have on the same rows."""
        objective = self.config.training
        host = y3.index_select(1, bank.chunk_index).transpose(0, 1).float()  # (A, rows, L)
        if objective.objective == "reconstruction":
            target = host
        else:
            direction = grad3.index_select(1, bank.chunk_index).transpose(0, 1).float()
            scale = _rms(host) / _rms(direction).clamp_min(1e-30) * objective.gradient_match_scale
            target = -direction * scale[:, None, None]
        energy = target.detach().square().mean(dim=(1, 2))
        return (g.float() - target).square().mean(dim=(1, 2)), energy  # (A,), (A,)

    def _record_seed_loss(self, chunks: torch.Tensor, losses: torch.Tensor, energy: torch.Tensor,
                          seed_loss: torch.Tensor | None = None) -> None:
        """Fold one step into the seeds' (A, 2) EMAs of the loss and of the target's energy."""
        seed_loss = self.state.seed_loss if seed_loss is None else seed_loss
        current = seed_loss.index_select(0, chunks)
        new = torch.stack([losses, energy], dim=1)
        ema = torch.where(torch.isnan(current), new, 0.9 * current + 0.1 * new)
        seed_loss.index_copy_(0, chunks, ema)

    def _ramp_alpha(self, groups, per_epoch: bool) -> None:
        """Move the GRAFTING seeds' alpha one ramp unit, each group by its strategy; the
        reference, signal and loss are read only for the strategies that gate on them."""
        config = self.config.grafting
        state = self.state
        for strategy, chunks, _ in groups:
            alpha = state.alpha.index_select(0, chunks)
            reference = signal = loss = None
            if strategy in (GraftingStrategy.PERFORMANCE_LINKED, GraftingStrategy.GRAD_NORM_GATED):
                reference = state.graft_ref.index_select(0, chunks)
            if strategy in (GraftingStrategy.DRIFT_CONTROLLED, GraftingStrategy.GRAD_NORM_GATED):
                signal = state.graft_signal.index_select(0, chunks)
            if strategy is GraftingStrategy.PERFORMANCE_LINKED:
                loss = self.loss_ema.float()
                reference = torch.where(torch.isnan(reference), loss, reference)
                state.graft_ref.index_copy_(0, chunks, reference)
            new = grafting.ramp(strategy, alpha, config, loss=loss, reference=reference, signal=signal)
            state.alpha.index_copy_(0, chunks, new)

    def _measure_grafting(self, plan: _Plan, g: torch.Tensor, stats: torch.Tensor) -> None:
        for strategy, chunks, slots in plan.grafting:
            if strategy is not GraftingStrategy.DRIFT_CONTROLLED:
                continue
            g_rms = _rms(g.index_select(0, slots).float())
            out_rms = (stats.index_select(0, chunks)[:, SUMSQ] / (g.shape[1] * g.shape[2])).sqrt()
            drift = self.state.alpha.index_select(0, chunks) * g_rms / out_rms.clamp_min(1e-30)
            self.state.graft_signal.index_copy_(0, chunks, drift.float())

    def _measure_gradient(self, plan: _Plan, grad: torch.Tensor) -> None:
        grad3 = self._rows(grad).unflatten(1, (self.seeds, -1))
        for strategy, chunks, _ in plan.grafting:
            if strategy is not GraftingStrategy.GRAD_NORM_GATED:
                continue
            rms = _rms(grad3.index_select(1, chunks).transpose(0, 1).float())
            reference = self.state.graft_ref.index_select(0, chunks)
            self.state.graft_ref.index_copy_(0, chunks, torch.where(torch.isnan(reference), rms, reference))
            self.state.graft_signal.index_copy_(0, chunks, rms)

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Feed the task loss to `performance_linked` grafting (no sync: stays on the device).
        Every step, in every layer: no reshape op for a scalar loss, and the EMA is written by
        `where` itself (its inputs are temporaries, so `out=ema` aliases none)."""
        ema = self.loss_ema
        value = loss.detach().to(ema.dtype)
        if value.dim():
            value = value.reshape(())
        torch.where(torch.isnan(ema), value, 0.9 * ema + 0.1 * value, out=ema)

    # --- evaluation: with and without ---------------------------------------------------------

    @contextmanager
    def disabled(self, seeds: Iterable[int]) -> Iterator[None]:
        """Inside the block the given seeds are the identity (the controller's 'without' run)."""
        previous = self._disabled
        self._disabled = previous | frozenset(int(s) for s in seeds)
        self._plan = self._build_plan()
        try:
            yield
        finally:
            self._disabled = previous
            self._plan = self._build_plan()

    # --- telemetry ---------------------------------------------------------------------------

    def _fold_probe(self) -> None:
        if self._probe.grad is not None:
            with torch.no_grad():
                self.state.health[:, GRAD_SUMSQ:] += self._probe.grad
            self._probe.grad = None

    def readiness(self, loss_ema: np.ndarray, energy_ema: np.ndarray, alpha: np.ndarray) -> list[bool]:
        config = self.config
        ready = []
        for seed in range(self.seeds):
            stage = self.stage(seed)
            steps = self._step - int(self._control["stage_entry_step"][seed])
            epochs = int(self._control["epochs_in_stage"][seed]) + 1  # the epoch being reported
            if stage is S.GERMINATED:
                future = self._loads.get(seed)
                ok = future is not None and future.done() and future.exception() is None
            elif stage is S.TRAINING:
                ok = (steps >= config.training.min_steps and np.isfinite(loss_ema[seed])
                      and loss_ema[seed] <= config.training.ready_loss_ratio * energy_ema[seed])
            elif stage is S.GRAFTING:
                ok = alpha[seed] >= 1.0
            elif stage is S.STABILIZATION:
                ok = steps >= config.stabilization_steps
            elif stage is S.EVALUATING:
                ok = epochs >= config.evaluation_epochs
            elif stage is S.FINE_TUNING:
                ok = epochs >= config.fine_tuning_epochs
            else:
                ok = False
            ready.append(bool(ok))
        return ready

    def health_signal(self, run_id: str = "", epoch: int | None = None, step: int | None = None,
                      reset: bool = True) -> HealthSignal:
        """The layer's telemetry since the last read, as one HealthSignal (one host sync)."""
        self._fold_probe()
        state = self.state
        packed = torch.cat([state.health.flatten(), state.alpha.double(),
                            state.seed_loss.double().flatten()]).cpu().numpy()  # sync: once per report
        c = self.seeds
        health = packed[:6 * c].reshape(c, 6)
        alpha = packed[6 * c:7 * c]
        seed_loss = packed[7 * c:].reshape(c, 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            count = health[:, COUNT]
            mean = np.where(count > 0, health[:, SUM] / count, 0.0)
            variance = np.where(count > 0, np.maximum(health[:, SUMSQ] / count - mean**2, 0.0), 0.0)
            dead = np.where(count > 0, health[:, DEAD] / count, 0.0)
            energy = np.where(health[:, GRAD_COUNT] > 0, health[:, GRAD_SUMSQ] / health[:, GRAD_COUNT], 0.0)
        if reset:
            state.health.zero_()
        finite = partial(np.nan_to_num, nan=0.0, posinf=3e38, neginf=-3e38)
        return HealthSignal(
            run_id=run_id, layer_id=self.layer_id, layer_name=self.layer_name,
            epoch=self._epoch if epoch is None else epoch, step=self._step if step is None else step,
            lifecycle=self.stages, activation_mean=finite(mean).tolist(),
            activation_variance=finite(variance).tolist(),
            dead_ratio=np.clip(dead, 0.0, 1.0).tolist(), gradient_energy=finite(energy).tolist(),
            is_ready_for_transition=self.readiness(seed_loss[:, 0], seed_loss[:, 1], alpha))

    # --- device moves and checkpoints ---------------------------------------------------------

    def _apply(self, fn, recurse=True):
        from_meta = self.state.alpha.is_meta
        module = super()._apply(fn, recurse)
        grad = self._probe.grad
        device = fn(self._probe.detach()).device  # the probe keeps float64 through .half() etc.
        if from_meta and device.type != "meta":
            # `to_empty` of a layer built on the meta device: its buffers hold no data, so the
            # seed state is what the host mirror says (fresh, until a state dict is loaded).
            self._probe = kernels.new_probe(self.seeds, device)
            self.state = SeedState(self.seeds).to(device)
            self.state.write_control(self._control)
            self.loss_ema = torch.full((), float("nan"), device=device)
            self.meta = torch.zeros(0, dtype=torch.uint8, device=device)
        else:
            self._probe = self._probe.detach().to(device).requires_grad_()
            if grad is not None:
                self._probe.grad = grad.to(device)
        self._plan = self._build_plan()
        self._warmed = set()  # warm-ups are per device
        return module

    def _meta_json(self) -> dict:
        return {"format": META_FORMAT, "kernel_table": self._kernel_table, "step": self._step,
                "epoch": self._epoch}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._fold_probe()
        data = json.dumps(self._meta_json(), sort_keys=True).encode()
        self.meta = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.meta.device)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        meta_key, lifecycle_key = prefix + "meta", prefix + "state.lifecycle"
        if meta_key in state_dict and prefix + "loss_ema" not in state_dict:  # saved before it was kept
            state_dict[prefix + "loss_ema"] = torch.full((), float("nan"))
        if meta_key in state_dict and lifecycle_key in state_dict:
            read = _read_saved_state(state_dict, prefix, self.seeds, self._control)
            if isinstance(read, str):
                error_msgs.append(read)  # the layer keeps the state it had
                return
            meta, control = read
            self._kernel_table = list(meta["kernel_table"])
            self._step, self._epoch = int(meta["step"]), int(meta["epoch"])
            self.meta = torch.empty_like(state_dict[meta_key], device=self.meta.device)
            self._rebuild_banks({}, control)  # empty, then filled by the recursive load
            for bank in self.banks.values():
                for p in bank.parameters():
                    p.requires_grad_(bank.stage in self._trainable)
            self._control = control
            self._failed = {}
            self._loads = {}
            for seed in range(self.seeds):
                if S.from_code(int(control["lifecycle"][seed])) in (S.GERMINATED, S.LOADING):
                    self._start_load(seed, self._kernel_table[control["kernel_slot"][seed]])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"layer_id={self.layer_id}, name={self.layer_name!r}, seeds={self.seeds}, "
                f"chunk_width={self.chunk_width}, interface={self.interface}")


def _read_saved_state(state_dict, prefix: str, seeds: int, current: dict[str, np.ndarray]
                      ) -> tuple[dict, dict[str, np.ndarray]] | str:
    """The saved layer record and control arrays, or the reason they cannot be taken (a record
    that is not this format's, a control array of another seed count, a code out of range)."""
    where = f"{prefix}meta"
    try:
        meta = json.loads(bytes(state_dict[where].cpu().numpy().tobytes()).decode())
    except (ValueError, TypeError, RuntimeError) as e:  # not UTF-8 JSON, not a byte tensor
        return f"{where}: not a Kasmina layer record ({type(e).__name__}: {e})"
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        return f"{where}: unknown format {found!r}"
    table = meta.get("kernel_table")
    if (not isinstance(table, list) or not all(isinstance(k, str) for k in table)
            or any(not isinstance(meta.get(k), int) for k in ("step", "epoch"))):
        return f"{where}: kernel_table (a list of ids), step and epoch (integers) are required"
    control = {}
    for name, like in current.items():
        key = f"{prefix}state.{name}"
        if key not in state_dict:
            return f"{key}: missing"
        saved = state_dict[key].cpu().numpy().copy()
        if saved.shape != like.shape:
            return f"{key}: {tuple(saved.shape)} values for {seeds} seeds"
        control[name] = saved
    if int(control["lifecycle"].max(initial=0)) >= len(S):
        return f"{prefix}state.lifecycle: a code that is no lifecycle stage"
    for seed, (code, slot) in enumerate(zip(control["lifecycle"], control["kernel_slot"])):
        if S.from_code(int(code)) in HAS_KERNEL and not 0 <= int(slot) < len(table):
            return (f"{prefix}state.kernel_slot: seed {seed} names kernel {int(slot)} of the "
                    f"{len(table)} in {where}")
    return meta, control


def _after_load(layer: KasminaLayer, incompatible_keys) -> None:
    """Post-load hook: re-derive the forward plan; a checkpoint whose seed state fails its
    checksum is flagged for rollback."""
    layer._plan = layer._build_plan()
    layer.rollback_requested = layer.verify_state()


def _allowed(stage: SeedLifecycle) -> frozenset[SeedLifecycle]:
    from esper.contracts import LIFECYCLE_TRANSITIONS

    return LIFECYCLE_TRANSITIONS[stage]


def _bank_name(stage: SeedLifecycle, slot: int) -> str:
    return f"{stage.value.lower()}_{slot}"


def _bank_key(bank: SeedBank, shapes: _Shapes) -> tuple:
    return ("bank", bank.kernel_artifact_id, bank.stage in BLENDING, bank.size,
            tuple(p.requires_grad for p in bank.parameters()), shapes)


def _rms(t: torch.Tensor) -> torch.Tensor:
    """Per-seed RMS of an (A, ...) tensor."""
    return t.flatten(1).square().mean(dim=1).sqrt()


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _dtype_of(module: nn.Module) -> torch.dtype:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32

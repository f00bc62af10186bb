"""Batched seed execution: the seeds of one layer that run one kernel in one stage form a
`SeedBank`, their weights stacked on a leading seed axis and run as one `vmap`ped call, so a
family of a thousand seeds is a handful of batched matmuls, not a Python loop over seeds.

A bank's stacked tensors are the seeds' weights (not copies of per-seed modules): optimizers
see one parameter per blueprint tensor per bank. Banks are rebuilt only at epoch boundaries,
when seeds change stage; see `KasminaLayer.on_epoch_end`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

try:  # functorch's own calls under torch.func.vmap (private); absent: torch.func.vmap itself
    from torch._C import _functorch
    from torch._functorch.vmap import lazy_load_decompositions

    _DIRECT_VMAP = all(hasattr(_functorch, name) for name in (
        "_vmap_increment_nesting", "_vmap_decrement_nesting", "_add_batch_dim",
        "_remove_batch_dim"))
except ImportError:  # pragma: no cover - a torch that moved them
    _DIRECT_VMAP = False

from esper.contracts import SeedLifecycle


def _key(name: str) -> str:
    return name.replace(".", "__")


class SeedBank(nn.Module):
    """Seeds `chunks` of one layer running kernel `kernel_artifact_id` in stage `stage`.

    `forward(x)` -> (A, *g_shape): every seed's blueprint output for the shared input x.
    The template module (the cached kernel) is not a submodule: its own weights are never used.
    """

    def __init__(self, template: nn.Module, kernel_artifact_id: str, stage: SeedLifecycle,
                 chunks: Sequence[int], params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], trainable: bool) -> None:
        super().__init__()
        self.kernel_artifact_id = kernel_artifact_id
        self.stage = stage
        self.chunks = list(chunks)
        device = next(iter(params.values())).device if params else None
        self.register_buffer("chunk_index", torch.tensor(self.chunks, dtype=torch.long, device=device),
                             persistent=False)
        self.weights = nn.ParameterDict(
            {_key(n): nn.Parameter(t, requires_grad=trainable) for n, t in params.items()})
        self.stacked_buffers = nn.Module()
        for n, t in buffers.items():
            self.stacked_buffers.register_buffer(_key(n), t)
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        self._param_keys = [_key(n) for n in params]
        self._buffer_keys = [_key(n) for n in buffers]
        object.__setattr__(self, "template", template)
        # Where each stacked tensor goes in the template: (its module's parameter or buffer
        # table, the attribute name), parameters first, as `_run` receives them. None for a
        # template with a tensor under two names (tied weights): functional_call unties those.
        untied = (len(list(template.named_parameters(remove_duplicate=False))) == len(params)
                  and len(list(template.named_buffers(remove_duplicate=False))) == len(buffers))
        object.__setattr__(self, "_slots", [_slot(template, n, "_parameters") for n in params]
                           + [_slot(template, n, "_buffers") for n in buffers] if untied else None)

    @classmethod
    def fresh(cls, template: nn.Module, kernel_artifact_id: str, stage: SeedLifecycle,
              chunks: Sequence[int], dtype: torch.dtype, device: torch.device,
              trainable: bool) -> SeedBank:
        """New seeds, each starting from the kernel's initial weights."""
        count = len(chunks)

        def stack(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            return t.unsqueeze(0).repeat(count, *([1] * t.dim()))  # (A, *shape), a fresh copy

        return cls(template, kernel_artifact_id, stage, chunks,
                   {n: stack(p) for n, p in template.named_parameters()},
                   {n: stack(b) for n, b in template.named_buffers()}, trainable)

    @property
    def size(self) -> int:
        return len(self.chunks)

    def seed_state(self) -> dict[str, torch.Tensor]:
        """Every stacked tensor by its name in the template, (A, *shape)."""
        state = {n: self.weights[_key(n)] for n in self._param_names}
        state |= {n: getattr(self.stacked_buffers, _key(n)) for n in self._buffer_names}
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.template.training != self.training:
            self.template.train(self.training)
        # The stacked tensors straight from the tables (module attribute lookups and key
        # rewriting on every call cost more host time than the lookups themselves).
        params, buffers = self.weights._parameters, self.stacked_buffers._buffers
        return self._run([*(params[k] for k in self._param_keys), *(buffers[k] for k in self._buffer_keys)], x)

    def _run(self, stacked: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The template run once per seed, batched by `vmap` over the seed axis of `stacked`
        (the parameters, then the buffers, each (A, *shape), in `_param_names` and
        `_buffer_names` order). What `functional_call` would do, with the same ops: the
        template's tensors swapped for the seed's and put back, written straight into its
        modules' tables, and the tensors passed to vmap as a flat tuple. functional_call's walk
        of the module tree and the dicts' pytree handling were ~0.2 ms of host time per bank
        per step on 2 EPYC cores, more than the blueprint's own ops."""
        if not stacked:  # a fixed-function kernel
            g = self.template(x)
            return g.unsqueeze(0).expand(self.size, *g.shape)  # stride 0 on the seed axis
        if self._slots is None:
            count = len(self._param_names)
            params = dict(zip(self._param_names, stacked[:count], strict=True))
            buffers = dict(zip(self._buffer_names, stacked[count:], strict=True))

            def one_seed_tied(p, b, inputs):
                return functional_call(self.template, {**p, **b}, (inputs,))

            return vmap(one_seed_tied, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
        slots = self._slots
        template = self.template

        def one_seed(*args):
            *tensors, inputs = args
            kept = [table[name] for table, name in slots]
            try:
                for (table, name), t in zip(slots, tensors, strict=True):
                    table[name] = t
                return template(inputs)
            finally:
                for (table, name), t in zip(slots, kept, strict=True):
                    table[name] = t

        return _vmap_seeds(one_seed, stacked, x)

    def warm_up(self, x: torch.Tensor, *, input_grad: bool,
                objective: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """One training-mode forward and backward of the bank on the scratch input `x`, so that
        what a first call pays once (torch.func's first vmap, the GEMM shapes' library kernels)
        is paid here and not inside a training step. Nothing of the bank changes: the weights
        are read through detached aliases (gradients go to no `.grad`), the buffers are copies
        (a BatchNorm's running statistics stay as they are). `input_grad`: also differentiate
        with respect to `x`, as a blending stage's backward does (a TRAINING seed's input is
        detached). `objective`: the scalar differentiated, from the bank's output (default: its
        sum). The caller keeps the RNG state (dropout draws from it)."""
        self.template.train(True)
        state = self.seed_state()
        params = [state[n].detach().requires_grad_(state[n].requires_grad) for n in self._param_names]
        buffers = [state[n].clone() for n in self._buffer_names]
        x = x.detach().requires_grad_(input_grad)
        with torch.enable_grad():
            g = self._run(params + buffers, x)
            inputs = [p for p in params if p.requires_grad] + ([x] if input_grad else [])
            loss = g.sum() if objective is None else objective(g)
            if inputs and loss.requires_grad:
                torch.autograd.grad(loss, inputs, allow_unused=True)

    def forward_one(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Seed `index` alone: the seed-by-seed path the batched one is tested against."""
        self.template.train(self.training)
        state = {n: t[index] for n, t in self.seed_state().items()}
        return functional_call(self.template, state, (x,))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel_artifact_id}, stage={self.stage.value}, seeds={self.size}"


_decompositions_loaded = False


def _vmap_seeds(fn: Callable[..., torch.Tensor], stacked: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`vmap(fn, in_dims=(0, ..., 0, None), randomness="different")(*stacked, x)`: the same
    functorch calls (one vmap level, the seed axis of each stacked tensor made its batch
    dimension, the output's taken back as dimension 0), without torch.func.vmap's per-call
    argument validation and pytree handling: 0.15-0.25 ms of CPU time per bank call on 2 shared
    EPYC vCPUs (scripts/bench_seed_step.py). torch.compile traces torch.func.vmap itself."""
    if torch.compiler.is_compiling() or not _DIRECT_VMAP:
        return vmap(fn, in_dims=(*(0 for _ in stacked), None), randomness="different")(*stacked, x)
    global _decompositions_loaded
    if not _decompositions_loaded:
        lazy_load_decompositions()  # what vmap does on each call: the batching rules' decompositions
        _decompositions_loaded = True
    size = stacked[0].shape[0]
    level = _functorch._vmap_increment_nesting(size, "different")
    try:
        out = fn(*(_functorch._add_batch_dim(t, 0, level) for t in stacked), x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"a seed bank's template must return a tensor, got {type(out).__name__}")
        return _functorch._remove_batch_dim(out, level, size, 0)
    finally:
        _functorch._vmap_decrement_nesting()


def _slot(template: nn.Module, name: str, table: str) -> tuple[dict, str]:
    """The parameter or buffer table (`table`) of the template's module that holds tensor
    `name`, and the tensor's attribute name there."""
    module_name, _, attribute = name.rpartition(".")
    tensors = getattr(template.get_submodule(module_name), table)
    if attribute not in tensors:
        raise KeyError(f"template has no {table[1:-1]} {name!r}")
    return tensors, attribute


def regroup(banks: Sequence[SeedBank], chunks: Sequence[int]) -> dict[str, torch.Tensor]:
    """The stacked state of seeds `chunks` (in that order), gathered from `banks` of one kernel."""
    where: dict[int, tuple[int, int]] = {}
    for b, bank in enumerate(banks):
        for i, chunk in enumerate(bank.chunks):
            where[chunk] = (b, i)
    names = list(banks[0].seed_state())
    offsets, total = [], 0
    for bank in banks:
        offsets.append(total)
        total += bank.size
    rows = torch.tensor([offsets[where[c][0]] + where[c][1] for c in chunks], dtype=torch.long)
    out = {}
    for name in names:
        everything = torch.cat([bank.seed_state()[name].detach() for bank in banks])  # (sum A, ...)
        out[name] = everything.index_select(0, rows.to(everything.device)).clone()
    return out

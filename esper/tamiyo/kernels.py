"""Where Tamiyo's kernels come from: a `KernelChooser` answers a `KernelQuery` with candidates,
best first (DESIGN.md section 11).

- `UrzaKernelChooser`: the catalog's VALIDATED kernels (`Urza.query_kernels`), and a bump of the
  chosen blueprint's `tamiyo_interest`. What a training run uses.
- `FixedKernelChooser`: a fixed list of candidates, filtered and ranked by the same rules as the
  catalog's query. For tests, the SDK and runs without a workspace (kernels from
  `kasmina.BlueprintKernelSource`).

The controller then drops candidates above `max_risk` and those that already failed at the seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from esper.contracts import CompiledKernelArtifact, KernelInterface, KernelQuery
from esper.contracts.assets import LATENCY_MS, PARAM_COUNT

if TYPE_CHECKING:
    from esper.urza import Urza


@dataclass(frozen=True)
class KernelCandidate:
    """One kernel a seed could receive, with what the choice is explained by."""

    kernel_artifact_id: str
    blueprint_id: str
    interface: KernelInterface | None = None
    target: str = "cpu"
    dtype: str = "float32"
    tags: tuple[str, ...] = ()
    risk_score: float | None = None
    latency_ms: float | None = None
    pipeline: str = "fast"
    conf_level: str | None = None
    parameters: int | None = None  # the graft's parameter count, as Urabrask measured it

    @classmethod
    def from_artifact(cls, artifact: CompiledKernelArtifact) -> KernelCandidate:
        report = artifact.validation_report
        params = report.benchmark_results.get(PARAM_COUNT) if report else None
        return cls(kernel_artifact_id=artifact.id, blueprint_id=artifact.blueprint_id,
                   interface=artifact.interface, target=artifact.target, dtype=artifact.dtype,
                   tags=tuple(sorted(set(artifact.tags))),
                   risk_score=report.risk_score if report else None,
                   latency_ms=report.benchmark_results.get(LATENCY_MS) if report else None,
                   pipeline=artifact.compilation_pipeline.value,
                   conf_level=report.conf_level if report else None,
                   parameters=int(params) if params is not None else None)


@runtime_checkable
class KernelChooser(Protocol):
    """Answers Tamiyo's KernelQuery; told which candidate was germinated."""

    def candidates(self, query: KernelQuery) -> list[KernelCandidate]:
        """Kernels that fit `query`, best first."""
        ...

    def note_choice(self, candidate: KernelCandidate) -> None:
        """The controller germinated a seed with `candidate`."""
        ...


class UrzaKernelChooser:
    """The catalog's VALIDATED kernels. One Urza is one SQLite connection: use the chooser on
    the thread that opened it (the training thread)."""

    def __init__(self, urza: Urza, *, actor: str = "tamiyo") -> None:
        self.urza = urza
        self.actor = actor

    def candidates(self, query: KernelQuery) -> list[KernelCandidate]:
        return [KernelCandidate.from_artifact(k)
                for k in self.urza.query_kernels(query).matching_kernels]

    def note_choice(self, candidate: KernelCandidate) -> None:
        # tamiyo_interest counts the germinations that picked the blueprint (HLD 7.1.3): the
        # forge recompiles high-interest blueprints first and curation keeps them.
        self.urza.add_tamiyo_interest(candidate.blueprint_id, 1.0, actor=self.actor)


@dataclass
class FixedKernelChooser:
    """A fixed list of candidates, filtered and ranked like `Urza.query_kernels`: interface,
    target, dtype, pipeline and tags must fit; more preferred tags first, then lower latency
    (unmeasured last), then kernel id."""

    kernels: list[KernelCandidate] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)  # kernel ids, in germination order

    @classmethod
    def from_entries(cls, entries: Mapping[str, tuple[object, KernelInterface]], *,
                     target: str = "cpu", dtype: str = "float32") -> FixedKernelChooser:
        """Candidates from `kasmina.BlueprintKernelSource.entries`: id -> (IR, interface)."""
        from esper.blueprints import blueprint_id

        return cls([KernelCandidate(kernel_artifact_id=kernel_id, blueprint_id=blueprint_id(ir),
                                    interface=interface, target=target, dtype=dtype)
                    for kernel_id, (ir, interface) in sorted(entries.items())])

    def candidates(self, query: KernelQuery) -> list[KernelCandidate]:
        fits = [k for k in self.kernels if _fits(k, query)]
        preferred = set(query.preferred_tags)
        fits.sort(key=lambda k: (-len(preferred & set(k.tags)), k.latency_ms is None,
                                 k.latency_ms or 0.0, k.kernel_artifact_id))
        return fits[:query.limit]

    def note_choice(self, candidate: KernelCandidate) -> None:
        self.chosen.append(candidate.kernel_artifact_id)


def _fits(k: KernelCandidate, q: KernelQuery) -> bool:
    tags = set(k.tags)
    checks = [
        q.blueprint_id is None or k.blueprint_id == q.blueprint_id,
        q.interface is None or k.interface is None or k.interface == q.interface,
        q.target is None or k.target == q.target,
        q.dtype is None or k.dtype == q.dtype,
        q.pipeline is None or k.pipeline == q.pipeline.value,
        set(q.required_tags) <= tags,
        not set(q.excluded_tags) & tags,
        q.max_latency_ms is None or (k.latency_ms is not None and k.latency_ms <= q.max_latency_ms),
    ]
    return all(checks)

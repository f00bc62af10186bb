"""The bench in a catalog that already holds a measured population and field outcomes.

Twenty VALIDATED kernels carry bench-signed reports with known metrics (their artifacts are
never loaded: only their reports matter to stages 3 and 4), and Tamiyo's field reports say how
each fared in training: the ones that lose precision were culled or rolled back, the others
fossilized. Then the bench judges one real kernel, built through the forge's own path, in its
sandboxed child. It must tag the newcomer by percentile against the twenty, re-tag the twenty
whose tags the grown population changes (one bench-signed refresh), and train the risk model
from the field reports before scoring the newcomer.
"""

from __future__ import annotations

import json

from catalog_helpers import blueprint, kernel, library_ir, plant
from typer.testing import CliRunner

from esper.contracts import (
    LATENCY_MS,
    MEMORY_MB,
    FieldReport,
    KernelStatus,
    SeedLifecycle,
    UrabraskValidationReport,
)
from esper.signing import sign
from esper.urza import Urza
from esper_cli.main import app
from pipelines.urabrask import risk, tags
from pipelines.urabrask.bench import Bench, BenchOptions

POPULATION = 20


def seed_population(urza: Urza) -> list[dict]:
    """Twenty validated kernels, latency 0.01-100 ms and memory 0.1-1000 MB, tagged when the
    population was still small (every one 'medium_speed', as fixed thresholds might say)."""
    members = []
    for i in range(POPULATION):
        drifting = i % 2 == 1
        metrics = {LATENCY_MS: 0.01 * 1.6 ** i, MEMORY_MB: 0.1 * 1.6 ** (POPULATION - 1 - i),
                   "param_count": 1000.0 + i, "latency_cv_pct": 1.0,
                   tags.DRIFT: 1e-3 if drifting else 1e-8}
        k = kernel(urza, blueprint(urza, f"population_{i}"))
        report = UrabraskValidationReport(
            kernel_artifact_id=k.id, blueprint_id=k.blueprint_id, passed_validation=True,
            benchmark_results=metrics, generated_tags=["medium_speed"])
        urza.apply_validation_report(
            sign(report.to_json().encode(), urza.workspace.private_key("bench"), "bench"),
            actor="bench-earlier")
        members.append({"id": k.id, "blueprint_id": k.blueprint_id, "drifting": drifting,
                        **metrics})
    return members


def report_outcomes(urza: Urza, members: list[dict], runs: range) -> None:
    """One field report per kernel per run: drifting kernels failed, the others were kept."""
    for run in runs:
        for m in members:
            outcome = SeedLifecycle.CULLED if m["drifting"] else SeedLifecycle.FOSSILIZED
            if m["drifting"] and run % 2:
                outcome = SeedLifecycle.ROLLED_BACK
            urza.record_field_report(FieldReport(
                report_id=f"run{run}-{m['id']}", run_id=f"run{run}", blueprint_id=m["blueprint_id"],
                kernel_artifact_id=m["id"], seed_id="0:1", pre_metric=0.5,
                post_metric=0.6 if outcome is SeedLifecycle.FOSSILIZED else 0.4, outcome=outcome))


def test_a_grown_population_retags_and_field_reports_train_the_risk_model(workspace, tmp_path):
    with Urza.open(workspace) as urza:
        members = seed_population(urza)
        report_outcomes(urza, members, range(2))  # 40 labels, 20 of each class
        newcomer = plant(urza, tmp_path, library_ir("low_rank_r2"), "linear:16:4")
        summary = Bench(workspace, urza, None, BenchOptions(round_seconds=0.03)).run(once=True)

        [job] = summary.jobs
        assert job.kernel_id == newcomer and job.validated, job.reason
        judged = urza.get_kernel(newcomer)
        context = judged.validation_report.hardware_context
        assert context["tag_policy"] == "percentile" and context["tag_population"] == "20"

        # Stage 4: trained in the daemon from the 40 field reports, then used.
        policy = urza.get_policy(risk.POLICY_NAME)
        assert policy.metadata["labels"] == 40 and policy.metadata["positives"] == 20
        assert summary.risk_model == policy.version == context["risk_model"]
        model = risk.RiskModel.latest(urza)
        population = [risk.features(m, pipeline="fast", dtype="float32") for m in members]
        culled = [model.score(f) for f, m in zip(population, members) if m["drifting"]]
        kept = [model.score(f) for f, m in zip(population, members) if not m["drifting"]]
        assert min(culled) > 0.5 > max(kept)
        # A real fp32 kernel has no measurable drift: it scores like the kernels that were kept.
        assert judged.validation_report.risk_score < 0.5
        assert judged.validation_report.conf_level in ("High", "Moderate")

        # Stage 3 refresh: every member now carries the tags the population of 21 gives it.
        expected = tags.retag_plan(urza.list_kernels(status=KernelStatus.VALIDATED), device_kind="cpu")
        assert expected == {}  # nothing left to re-tag
        now = {k.id: k.tags for k in urza.list_kernels(status=KernelStatus.VALIDATED)}
        assert summary.retagged == sum(now[m["id"]] != ["medium_speed"] for m in members) > 10
        retagged = [json.loads(r["details"]) for r in urza.db.query(
            "SELECT details FROM audit_log WHERE action = 'kernel.retagged'")]
        assert len(retagged) == 1 and retagged[0]["policy"] == "percentile"
        by_memory = sorted(urza.list_kernels(status=KernelStatus.VALIDATED),
                           key=lambda k: k.validation_report.benchmark_results[MEMORY_MB])
        assert urza.verify().ok

        # No new labels, no new version; ten more, a new one.
        assert risk.maybe_retrain(urza, actor="test").version == policy.version
        report_outcomes(urza, members[:10], range(2, 3))
        assert risk.maybe_retrain(urza, actor="test").version != policy.version

    # HLD E.5 stage 2: `--tag low_memory` returns exactly the bottom quartile by memory.
    query = CliRunner().invoke(app, ["--workspace", str(workspace.root), "--json", "library",
                                     "query", "--tag", "low_memory"], catch_exceptions=False)
    assert query.exit_code == 0, query.output
    returned = {k["id"] for k in json.loads(query.output)}
    low = {k.id for k in by_memory if "low_memory" in k.tags}
    assert returned == low
    # 21 kernels, each ranked against its 20 peers: rank <= 0.25 means at most 5 peers below.
    assert low == {k.id for k in by_memory[:6]}

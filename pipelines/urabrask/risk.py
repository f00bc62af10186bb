"""Stage 4: the risk that a kernel fails in the field, from its validation profile.

    model = RiskModel.latest(urza)              # None until one has been trained
    score = risk_score(features, model)         # in [0, 1]
    model = maybe_retrain(urza, actor="bench")  # a new version when enough new labels arrived

Labels come from Urza's field reports: an adaptation whose kernel ended CULLED or ROLLED_BACK is
a positive (it hurt or did not help), FOSSILIZED a negative; CANCELLED says nothing about the
kernel and is left out. Each field report is one sample, with the features of its kernel's
validation report (FEATURES). The classifier is XGBoost (binary:logistic, small and shallow:
a few hundred labels at most for a long time); its model is kept in XGBoost's own JSON format
(no pickle) as a blob in Urza's store, recorded with `urza.record_policy("urabrask-risk", ...)`
and metadata saying how many labels trained it.

Training waits for MIN_LABELS labels with at least MIN_PER_CLASS of each class, and a new
version is trained once RETRAIN_AFTER new labels have arrived since the last one.

Before that, the rule-based prior (`prior_risk`) scores what is known to go wrong in the field
without any field data: numerical drift (a kernel that loses precision diverges in training),
timing variance (unstable kernels stall steps), low-precision dtypes and compiled pipelines
(more that can differ from the eager reference). Base 0.1; see the weights below.

conf_level from the score: High below 0.2, Moderate below 0.5, else Speculative; under the
prior a kernel is never High (no field evidence backs the number).

urabrask_interest: how unusual a profile is: the mean absolute z-score of its log features
against the target's population (0 with fewer than 5 peers).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from esper.contracts import LATENCY_MS, MEMORY_MB, SeedLifecycle
from pipelines.urabrask.tags import DRIFT, DRIFT_LIMITS

if TYPE_CHECKING:
    from esper.urza import Urza

POLICY_NAME = "urabrask-risk"
MIN_LABELS = 20
MIN_PER_CLASS = 3
RETRAIN_AFTER = 10
POSITIVE = {SeedLifecycle.CULLED, SeedLifecycle.ROLLED_BACK}
NEGATIVE = {SeedLifecycle.FOSSILIZED}
FEATURES = ("log_latency_ms", "log_memory_mb", "log_params", "log_drift", "latency_cv_pct",
            "compiled", "low_precision")
INTEREST_FEATURES = ("log_latency_ms", "log_memory_mb", "log_params", "log_drift")
INTEREST_MIN_PEERS = 5


def features(metrics: Mapping[str, float], *, pipeline: str, dtype: str) -> dict[str, float]:
    """The model's inputs, from a report's benchmark_results and the kernel's build."""
    return {
        "log_latency_ms": math.log10(max(metrics.get(LATENCY_MS, 0.0), 1e-6)),
        "log_memory_mb": math.log10(max(metrics.get(MEMORY_MB, 0.0), 1e-6)),
        "log_params": math.log10(max(metrics.get("param_count", 0.0), 1.0)),
        "log_drift": math.log10(max(metrics.get(DRIFT, 0.0), 1e-12)),
        "latency_cv_pct": float(metrics.get("latency_cv_pct", 0.0)),
        "compiled": 0.0 if pipeline == "fast" else 1.0,
        "low_precision": 0.0 if dtype == "float32" else 1.0,
    }


def prior_risk(feats: Mapping[str, float], dtype: str) -> float:
    """The documented rule-based prior (see the module docstring)."""
    score = 0.1
    drift_limit = math.log10(DRIFT_LIMITS.get(dtype, DRIFT_LIMITS["float32"]))
    if feats["log_drift"] >= drift_limit:
        score += 0.4  # not numerically_stable
    if feats["latency_cv_pct"] > 10.0:
        score += 0.15  # timing varies by more than 10% between identical rounds
    score += 0.1 * feats["compiled"] + 0.1 * feats["low_precision"]
    return min(score, 1.0)


def conf_level(score: float, *, learned: bool) -> str:
    if score < 0.2 and learned:
        return "High"
    if score < 0.5:
        return "Moderate"
    return "Speculative"


def interest(feats: Mapping[str, float], population: Sequence[Mapping[str, float]]) -> float:
    """Mean |z| of the log features against the population (0 with too few peers)."""
    if len(population) < INTEREST_MIN_PEERS:
        return 0.0
    total = 0.0
    for name in INTEREST_FEATURES:
        values = [p[name] for p in population]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        total += abs(feats[name] - mean) / max(std, 1e-3)
    return round(total / len(INTEREST_FEATURES), 4)


@dataclass
class RiskModel:
    """One trained version: the XGBoost booster and its record."""

    version: str
    booster: Any
    labels: int

    def score(self, feats: Mapping[str, float]) -> float:
        import numpy as np
        import xgboost as xgb

        row = np.array([[feats[name] for name in FEATURES]], dtype=np.float32)
        return float(self.booster.predict(xgb.DMatrix(row, feature_names=list(FEATURES)))[0])

    @classmethod
    def latest(cls, urza: Urza) -> RiskModel | None:
        from esper.errors import NotFoundError

        try:
            record = urza.get_policy(POLICY_NAME)
        except NotFoundError:
            return None
        return cls.load(urza, record)

    @classmethod
    def load(cls, urza: Urza, record) -> RiskModel:
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(bytearray(urza.store.get(record.blob_hash)))  # JSON, hash-checked
        return cls(record.version, booster, int(record.metadata.get("labels", 0)))


def labelled_samples(urza: Urza) -> tuple[list[dict[str, float]], list[int]]:
    """(features, label) per field report whose kernel has a validation report."""
    kernels: dict[str, Any] = {}
    rows, labels = [], []
    for report in urza.list_field_reports():
        if report.outcome in POSITIVE:
            label = 1
        elif report.outcome in NEGATIVE:
            label = 0
        else:
            continue
        kernel_id = report.kernel_artifact_id
        if kernel_id not in kernels:
            try:
                kernels[kernel_id] = urza.get_kernel(kernel_id)
            except Exception:  # noqa: BLE001 - a report for a kernel not in this catalog
                kernels[kernel_id] = None
        kernel = kernels[kernel_id]
        if kernel is None or kernel.validation_report is None:
            continue
        rows.append(features(kernel.validation_report.benchmark_results,
                             pipeline=kernel.compilation_pipeline.value, dtype=kernel.dtype))
        labels.append(label)
    return rows, labels


def train(rows: Sequence[Mapping[str, float]], labels: Sequence[int], *, seed: int = 0):
    """A small, deterministic booster (one thread, fixed seed)."""
    import numpy as np
    import xgboost as xgb

    matrix = xgb.DMatrix(np.array([[r[name] for name in FEATURES] for r in rows],
                                  dtype=np.float32),
                         label=np.array(labels, dtype=np.float32), feature_names=list(FEATURES))
    params = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.3, "subsample": 1.0,
              "min_child_weight": 1.0, "lambda": 1.0, "nthread": 1, "seed": seed,
              "eval_metric": "logloss"}
    return xgb.train(params, matrix, num_boost_round=50)


def maybe_retrain(urza: Urza, *, actor: str, force: bool = False) -> RiskModel | None:
    """Train and record a new version when enough new labels arrived; else the latest (or None)."""
    current = RiskModel.latest(urza)
    rows, labels = labelled_samples(urza)
    positives = sum(labels)
    enough = (len(labels) >= MIN_LABELS and positives >= MIN_PER_CLASS
              and len(labels) - positives >= MIN_PER_CLASS)
    fresh = current is None or len(labels) - current.labels >= RETRAIN_AFTER
    if not enough or not (fresh or force):
        return current
    booster = train(rows, labels)
    blob = bytes(booster.save_raw(raw_format="json"))
    digest = urza.store.put(blob)
    version = f"{len(labels):06d}-{hashlib.sha256(blob).hexdigest()[:12]}"
    urza.record_policy(POLICY_NAME, version, digest,
                       {"labels": len(labels), "positives": positives,
                        "features": list(FEATURES), "format": "xgboost-json"}, actor=actor)
    return RiskModel(version, booster, len(labels))


def assess(feats: Mapping[str, float], *, dtype: str, model: RiskModel | None,
           population: Iterable[Mapping[str, float]]) -> dict[str, Any]:
    """risk_score, conf_level, urabrask_interest and where the score came from."""
    score = model.score(feats) if model is not None else prior_risk(feats, dtype)
    score = min(max(score, 0.0), 1.0)
    return {"risk_score": round(score, 4), "conf_level": conf_level(score, learned=model is not None),
            "urabrask_interest": interest(feats, list(population)),
            "risk_source": model.version if model is not None else "prior"}



"""Stage 4: the prior, and an XGBoost model trained on synthetic field outcomes."""

from __future__ import annotations

import random

from pipelines.urabrask.risk import (
    FEATURES,
    RiskModel,
    assess,
    conf_level,
    features,
    interest,
    prior_risk,
    train,
)


def metrics(drift: float, cv: float = 2.0, latency: float = 1.0) -> dict[str, float]:
    return {"latency_ms_mean": latency, "memory_mb_peak": 4.0, "param_count": 1000.0,
            "precision_drift_vs_fp64": drift, "latency_cv_pct": cv}


def test_prior_scores_drift_and_variance_up():
    stable = prior_risk(features(metrics(1e-7), pipeline="fast", dtype="float32"), "float32")
    drifting = prior_risk(features(metrics(1e-2), pipeline="fast", dtype="float32"), "float32")
    noisy = prior_risk(features(metrics(1e-7, cv=30), pipeline="fast", dtype="float32"),
                       "float32")
    assert stable == 0.1 and drifting > noisy > stable


def test_conf_level_is_never_high_without_a_model():
    assert conf_level(0.05, learned=False) == "Moderate"
    assert conf_level(0.05, learned=True) == "High"
    assert conf_level(0.7, learned=True) == "Speculative"


def test_model_learns_that_drifting_kernels_fail_in_the_field():
    rng = random.Random(0)
    rows, labels = [], []
    for _ in range(80):
        drift = 10 ** rng.uniform(-8, -2)
        # Synthetic field reports: kernels with drift above 1e-5 were mostly culled or rolled back.
        failed = (drift > 1e-5) if rng.random() < 0.9 else (drift <= 1e-5)
        rows.append(features(metrics(drift, cv=rng.uniform(0, 5),
                                     latency=rng.uniform(0.1, 2)),
                             pipeline="fast", dtype="float32"))
        labels.append(int(failed))
    model = RiskModel("test", train(rows, labels), len(labels))
    safe = model.score(features(metrics(1e-8), pipeline="fast", dtype="float32"))
    risky = model.score(features(metrics(1e-3), pipeline="fast", dtype="float32"))
    assert risky > 0.5 > safe
    # The model's own JSON round-trips (no pickle) and scores the same.
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(bytearray(model.booster.save_raw(raw_format="json")))
    reloaded = RiskModel("test", booster, len(labels))
    assert reloaded.score(features(metrics(1e-3), pipeline="fast", dtype="float32")) == risky
    report = assess(features(metrics(1e-8), pipeline="fast", dtype="float32"), dtype="float32",
                    model=model, population=[])
    assert report["risk_source"] == "test" and report["conf_level"] == "High"
    assert set(FEATURES) <= set(rows[0])


def test_interest_grows_with_distance_from_the_population():
    peers = [features(metrics(1e-7, latency=1.0 + 0.1 * i), pipeline="fast", dtype="float32")
             for i in range(10)]
    usual = interest(features(metrics(1e-7, latency=1.4), pipeline="fast", dtype="float32"), peers)
    odd = interest(features(metrics(1e-2, latency=50.0), pipeline="fast", dtype="float32"), peers)
    assert odd > usual >= 0
    assert interest(peers[0], peers[:3]) == 0.0

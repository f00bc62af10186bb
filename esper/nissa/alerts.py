"""Alert rules of `esper watch`: each compares what the watcher knows with a threshold.

Thresholds come from `AlertRules`, loaded from a YAML file (`esper watch --alerts FILE`); every
field has a default, so the file only names what it changes:

    rollback_rate_max: 0.2      # of a run's finished adaptations, the share ROLLED_BACK
    consumer_lag_max: 500       # entries a consumer group has not read yet (or holds unacked)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from esper.contracts import NissaAlert, SeedLifecycle, describe_validation_error
from esper.errors import BadInputError
from esper.nissa.state import WatchState

Fraction = Annotated[float, Field(ge=0, le=1)]


class AlertRules(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # rollback_rate: a run whose finished adaptations (seeds reaching FOSSILIZED, CULLED,
    # CANCELLED or ROLLED_BACK) were rolled back more often than this, once it has enough.
    rollback_rate_max: Fraction = 0.25
    rollback_min_outcomes: Annotated[int, Field(ge=1)] = 4
    # certification_rate: VALIDATED among the kernels the bench has judged (Urza's counts).
    certification_rate_min: Fraction = 0.5
    certification_min_judged: Annotated[int, Field(ge=1)] = 10
    # consumer_lag: a group on any topic with more entries unread (XINFO lag; pending when the
    # server does not report lag) than this.
    consumer_lag_max: Annotated[int, Field(ge=0)] = 1000
    # daemon_stalled: no heartbeat for this long (daemons beat every 10 s while idle and after
    # each result; the default outlasts the forge's and bench's 300 s job wall limit).
    daemon_stale_s: Annotated[float, Field(gt=0)] = 600.0
    # run_stalled: a run that has not finished and has sent no epoch event for this long.
    epoch_stale_s: Annotated[float, Field(gt=0)] = 900.0
    # Daemons and runs silent for longer than this are forgotten, not alerted on forever.
    forget_after_s: Annotated[float, Field(gt=0)] = 86_400.0

    @classmethod
    def load(cls, path: Path | None) -> AlertRules:
        if path is None:
            return cls()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise BadInputError(f"{path}: cannot read alert rules: not a text file") from None
        except (OSError, yaml.YAMLError) as e:
            raise BadInputError(f"{path}: cannot read alert rules: {e}") from None
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise BadInputError(describe_validation_error(e, "alert rules", str(path))) from None


@dataclass(frozen=True)
class Alert:
    rule: str
    subject: str
    message: str
    value: float
    threshold: float

    @property
    def key(self) -> tuple[str, str]:
        return self.rule, self.subject

    def to_contract(self) -> NissaAlert:
        return NissaAlert(rule=self.rule, subject=self.subject, message=self.message,
                          value=self.value, threshold=self.threshold)

    def to_jsonable(self) -> dict[str, Any]:
        return {"rule": self.rule, "subject": self.subject, "message": self.message,
                "value": self.value, "threshold": self.threshold}


def evaluate(state: WatchState, rules: AlertRules, now: float | None = None) -> list[Alert]:
    """Every alert firing now, in rule order."""
    now = time.time() if now is None else now
    alerts: list[Alert] = []
    for run in state.runs.values():
        finished = sum(run.outcomes.values())
        rolled_back = run.outcomes[SeedLifecycle.ROLLED_BACK]
        if finished >= rules.rollback_min_outcomes:
            rate = rolled_back / finished
            if rate > rules.rollback_rate_max:
                alerts.append(Alert("rollback_rate", run.run_id,
                                    f"run {run.run_id}: {rolled_back} of {finished} adaptations "
                                    f"rolled back ({rate:.0%} > {rules.rollback_rate_max:.0%})",
                                    rate, rules.rollback_rate_max))
    kernels = state.catalog_counts("kernels")
    validated, rejected = kernels.get("VALIDATED", 0), kernels.get("REJECTED", 0)
    if validated + rejected >= rules.certification_min_judged:
        rate = validated / (validated + rejected)
        if rate < rules.certification_rate_min:
            alerts.append(Alert("certification_rate", "urabrask",
                                f"{validated} of {validated + rejected} compiled kernels judged "
                                f"VALIDATED ({rate:.0%} < {rules.certification_rate_min:.0%})",
                                rate, rules.certification_rate_min))
    for topic, groups in state.groups.items():
        for group in groups:
            behind = group.lag if group.lag is not None else group.pending
            if behind > rules.consumer_lag_max:
                alerts.append(Alert("consumer_lag", f"{topic.value}/{group.name}",
                                    f"group {group.name} on {topic.value} is {behind} entries "
                                    f"behind (> {rules.consumer_lag_max}; {group.pending} "
                                    "pending)", float(behind), float(rules.consumer_lag_max)))
    for daemon in state.daemons.values():
        age = now - daemon.last_beat_at
        if daemon.state != "stopping" and rules.daemon_stale_s < age < rules.forget_after_s:
            alerts.append(Alert("daemon_stalled", f"{daemon.daemon}/{daemon.worker_id}",
                                f"{daemon.daemon} {daemon.worker_id}: no heartbeat for "
                                f"{age:.0f} s (> {rules.daemon_stale_s:g} s)",
                                age, rules.daemon_stale_s))
    for run in state.runs.values():
        if run.finished:
            continue
        since = run.last_epoch_at if run.last_epoch_at is not None else run.first_seen_at
        age = now - since
        if rules.epoch_stale_s < age < rules.forget_after_s:
            alerts.append(Alert("run_stalled", run.run_id,
                                f"run {run.run_id}: no epoch event for {age:.0f} s "
                                f"(> {rules.epoch_stale_s:g} s)", age, rules.epoch_stale_s))
    return alerts

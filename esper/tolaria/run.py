"""`run_training`: everything `esper train` does, as one call (the command only renders it).

    result = run_training(load_config("configs/quickstart.yaml"), workspace=ws, redis_url=None)
    result.summary          # a dict for the summary table
    result.run_dir          # runs/<id>/: model.safetensors, model.json, lineage.json, ...

    run_training(None, workspace=ws, resume="quickstart-20250101-120000-ab12")   # --resume

It builds the data and the host model from the config (the run's seed first, so the same config
gives the same model), wraps the model with `config.kasmina` (exactly the modules it selects:
nothing is excluded behind the config's back), and with a workspace: kernels load through the
verifying loader (VALIDATED, forge- and bench-signed, hashes checked), the run and the seeds'
interfaces are registered in Urza (the forge compiles for registered interfaces), Tamiyo asks
Urza for kernels. When no VALIDATED kernel fits any seed yet, training goes on and says so once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import nn

import kasmina
from esper._fs import held
from esper.contracts import KernelQuery
from esper.errors import BadInputError, IntegrityError, NotFoundError
from esper.oona import check_url
from esper.tolaria.checkpoint import CheckpointStore, seed_everything
from esper.tolaria.config import TrainConfig, describe_problems, validation_problems
from esper.tolaria.data import build_data
from esper.tolaria.export import ModelOrigin
from esper.tolaria.models import build_model, freeze_host, init_host
from esper.tolaria.trainer import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    Progress,
    TolariaTrainer,
    TrainingHistory,
    new_run_id,
    resolve_device,
    write_run_config,
)
from esper.urza.values import require_path_safe

# What may differ between a run's saved config and the one given with --resume.
RESUMABLE_CHANGES = ("epochs", "device")
LOCK_FILE = ".lock"  # in the run directory, held while the run trains
DTYPE = "float32"


@dataclass
class RunResult:
    """A finished (or stopped) run."""

    run_id: str
    run_dir: Path
    model: nn.Module
    history: TrainingHistory

    @property
    def summary(self) -> dict[str, Any]:
        return self.history.summary

    @property
    def status(self) -> str:
        return self.history.status


def runs_root(config: TrainConfig, workspace: Any) -> Path:
    """Where runs go: `config.out_dir`, relative to the workspace (else the working directory)."""
    root = Path(config.out_dir).expanduser()
    if root.is_absolute():
        return root
    return (Path(workspace.root) if workspace is not None else Path.cwd()) / root


def find_run(run: str | os.PathLike[str], workspace: Any, out_dir: str | None = None) -> Path:
    """A run directory from `--resume RUN`: a path, or a run id under the runs directory."""
    path = Path(run).expanduser()
    if (path / CONFIG_FILE).is_file():
        return path.absolute()
    root = Path(out_dir or "runs")
    if not root.is_absolute():
        root = (Path(workspace.root) if workspace is not None else Path.cwd()) / root
    if (root / str(run) / CONFIG_FILE).is_file():
        return root / str(run)
    raise NotFoundError(f"no run {str(run)!r} (neither a run directory nor a run id under {root})")


def saved_config(run_dir: Path) -> TrainConfig:
    """The config a run saved in its folder as it began (config.json), for --resume.

    Tolaria wrote it, validated, with an atomic write; one that does not read back as a run
    config (not UTF-8 JSON, not an object, a field no config has) is damaged, as a checkpoint
    that does not verify is: IntegrityError (exit 3) naming the file; an unreadable one is
    BadInputError (exit 2)."""
    path = run_dir / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise IntegrityError(f"{path}: damaged run config: not UTF-8 text") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read the run's config ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise IntegrityError(f"{path}: damaged run config: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path}: damaged run config: a JSON {type(data).__name__}, "
                             "not an object")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        problem = describe_problems(validation_problems(e)).removeprefix("invalid run config: ")
        raise IntegrityError(f"{path}: damaged run config: {problem}") from None


def run_training(config: TrainConfig | None, *, workspace: Any = None, redis_url: str | None = None,
                 resume: str | os.PathLike[str] | None = None, progress: Progress | None = None,
                 run_id: str | None = None) -> RunResult:
    """Train one run (or continue `resume`, a run directory or id) and write its outputs.

    Returns the RunResult; raises BadInputError (exit 2) for a bad config or run,
    TrainingDivergedError (exit 1) when the run diverges past its rollbacks, IntegrityError
    (exit 3) for a checkpoint that does not verify."""
    if redis_url:
        # Malformed is bad input, refused before anything is written; a well-formed URL of a
        # Redis that does not answer is not: the run trains and publishes when it can.
        check_url(redis_url)
    if resume is not None:
        run_dir = find_run(resume, workspace, config.out_dir if config is not None else None)
        saved = saved_config(run_dir)
        return _train(_resumable(saved, config), saved, run_dir.name, run_dir, workspace,
                      redis_url, True, progress)
    if config is None:
        raise BadInputError("run_training needs a config, or a run to resume")
    run_id = new_run_id(config.name) if run_id is None else require_path_safe(run_id, "run id")
    run_dir = runs_root(config, workspace) / run_id
    _check_new(run_dir)
    return _train(config, config, run_id, run_dir, workspace, redis_url, False, progress)


def _check_new(run_dir: Path) -> None:
    """A new run may not take an existing run's folder. A folder without a config is a start
    that was killed before it began: the new run takes it."""
    if (run_dir / CONFIG_FILE).exists():
        raise BadInputError(f"{run_dir} already exists; choose another run id or --resume it")


@contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock while the run trains: a second process on the same run
    (a resume of a live run, the same --run-id twice) is refused. The lock goes with the
    process, so a killed run's folder is free at once."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"cannot make the run directory {run_dir}: {e.strerror or e}") from None
    with held(run_dir / LOCK_FILE, 0, lambda _: BadInputError(
            f"{run_dir} is in use: run {run_dir.name} is training in another process; wait for "
            "it to end, or choose another run id")):
        yield


def _train(config: TrainConfig, saved: TrainConfig, run_id: str, run_dir: Path,
           workspace: Any, redis_url: str | None, resume: bool,
           progress: Progress | None) -> RunResult:
    """Build the data, the model and the controller, and train under the run's lock. `saved` is
    the config in the run's folder (a new run's is `config`)."""
    if resume and config.epochs != saved.epochs:
        trained = max((c.epoch for c in CheckpointStore(run_dir / CHECKPOINTS_DIR).list()),
                      default=0)
        if config.epochs < trained:
            raise BadInputError(f"--epochs {config.epochs}: run {run_id} has trained {trained} "
                                f"epochs already; give {trained} or more")
    device = resolve_device(config.device)
    seed_everything(config.seed)  # the host model's initial weights come from the run's seed
    data = build_data(config.data, seed=config.data_seed)
    host = build_model(config.model, data.input_shape, data.out_dim)
    if config.model.init_from is not None and not resume:  # a resume has the weights
        init_host(host, config.model.init_from)
    freeze_host(host, config.model.freeze)
    # A resumed run's config was checked when it began, maybe by an earlier version that
    # spelled "no seeds" include: ["no-layer"] (a pattern that matches nothing).
    model, report = kasmina.wrap(host, config.kasmina, check_patterns=not resume)
    model.to(device)
    notices = []
    if not report.layers and (config.kasmina.targets or config.kasmina.blocks):  # [] is no seeds
        notices.append("kasmina wrapped no layer (check kasmina.include/exclude/targets): the "
                       "model trains without seeds")

    urza = None
    target = "cpu"
    if workspace is not None:
        from esper.urza import Urza
        from pipelines.tezzeret.toolchain import device_target

        target = device_target(str(device))
        urza = Urza.open(workspace)
    try:
        if urza is not None:
            urza.register_run(run_id, _registration(urza, run_id, saved, resume))
            for interface in report.interfaces:
                urza.register_interface(interface, target=target, dtype=DTYPE)
            missing = [str(i) for i in report.interfaces
                       if not urza.query_kernels(KernelQuery(interface=i, target=target, dtype=DTYPE,
                                                             limit=1)).matching_kernels]
            if missing:
                notices.append(f"no VALIDATED kernel yet for {', '.join(missing)} on "
                               f"{target}/{DTYPE}: training goes on, growing only once `esper "
                               "forge` and `esper bench` have made some")
        elif report.layers:
            notices.append("no workspace: Tamiyo has no kernels and the model trains without "
                           "growing")
        from esper.tamiyo import TamiyoController

        tamiyo = TamiyoController(model, config.tamiyo, urza=urza, run_id=run_id,
                                  device_target=target, dtype=DTYPE)
        origin = ModelOrigin(model=config.model.model_dump(mode="json"),
                             input_shape=tuple(data.input_shape), out_dim=data.out_dim, task=data.task)
        trainer = TolariaTrainer(model, tamiyo, config, data=data, workspace=workspace, urza=urza,
                                 redis_url=redis_url, run_id=run_id, run_dir=run_dir, device=device,
                                 resume=resume, progress=progress, origin=origin,
                                 notices=notices)
        with _run_lock(run_dir):
            if not resume:
                _check_new(run_dir)  # again, now that no other process can start it
            elif config.epochs != saved.epochs:  # later resumes keep the epochs this one plans
                write_run_config(run_dir, saved.model_copy(update={"epochs": config.epochs}))
            model, history = trainer.train()
    finally:
        if urza is not None:
            urza.close()
    return RunResult(run_id=run_id, run_dir=run_dir, model=model, history=history)


def _registration(urza: Any, run_id: str, saved: TrainConfig, resume: bool) -> str:
    """The config JSON to register the run with in Urza, which keeps the one a run began with
    and refuses another. A resumed run's config.json may plan other epochs than it began with
    (a resume with --epochs records them there; its epoch events carry them to the watcher):
    it registers with the epochs it began with, so every other field is still checked. A run
    registered by an earlier Esper lacks the config fields added since (their defaults change
    nothing): if its config resolves to this one, it is the same run, registered as it was."""
    data = saved.model_dump(mode="json")
    if not resume:
        return json.dumps(data)
    try:
        began = json.loads(urza.get_run(run_id).config_json)
    except NotFoundError:
        return json.dumps(data)  # trained without a workspace until now
    if not isinstance(began, dict) or not isinstance(began.get("epochs"), int):
        return json.dumps(data)  # Urza refuses it, naming the run
    data["epochs"] = began["epochs"]
    try:
        resolved = TrainConfig.model_validate(began).model_dump(mode="json")
    except ValidationError:
        resolved = None  # a field since removed or changed: Urza refuses it
    return json.dumps(began if resolved == data else data)


def _resumable(saved: TrainConfig, given: TrainConfig | None) -> TrainConfig:
    """The saved config, with the changes a resume may make (more epochs, another device)."""
    if given is None:
        return saved
    a, b = saved.model_dump(mode="json"), given.model_dump(mode="json")
    changed = sorted(k for k in a if a[k] != b[k] and k not in RESUMABLE_CHANGES + ("out_dir",))
    if changed:
        raise BadInputError(f"cannot resume with a different config: field(s) {', '.join(changed)} "
                            f"differ from the run's (only {', '.join(RESUMABLE_CHANGES)} may change)")
    return saved.model_copy(update={k: getattr(given, k) for k in RESUMABLE_CHANGES})


__all__: Sequence[str] = ("RunResult", "find_run", "run_training", "runs_root", "saved_config")

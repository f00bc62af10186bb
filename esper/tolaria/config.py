"""The run config of `esper train` (DESIGN.md section 12): one YAML file, strict pydantic.

    config = load_config("configs/quickstart.yaml", overrides=["optimizer.lr=3e-4", "epochs=2"])
    config.model, config.data, config.kasmina, config.tamiyo   # each section validated

Every error is a BadInputError whose one line names the file and the field:
`run.yaml: invalid run config: field 'optimizer.lr': Input should be greater than 0`. An error
that a command-line override caused names the override too.

The YAML is read by PyYAML's safe loader with two additions: `1e-3` is a float (YAML 1.1 reads
it as a string, which strict validation would then refuse), and a key given twice in one mapping
is an error instead of the last one silently winning.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from esper.errors import BadInputError, NotFoundError
from esper.tamiyo.config import TamiyoConfig
from kasmina.config import KasminaConfig

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what every generator takes (numpy's: < 2**32)
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Beta = Annotated[float, Field(ge=0, lt=1)]

# A zoo name (`mlp`) or an import path (`package.module:Attr`, Attr may be dotted).
_IDENT = r"[A-Za-z_]\w*"
_COMPONENT = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*(?::{_IDENT}(?:\.{_IDENT})*)?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _refuse_foreign(section: BaseModel, names: Sequence[str], owner: str) -> None:
    """An option of another optimizer or schedule, set to anything but its default, is an error
    rather than silently ignored."""
    given = [n for n in names if getattr(section, n) != type(section).model_fields[n].default]
    if given:
        raise ValueError(f"{owner} takes no {' or '.join(given)}")


class _Component(_Strict):
    """A built-in name or an import path, and the keyword arguments it is called with."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data  # `model: mlp`

    @field_validator("name")
    @classmethod
    def _name_or_path(cls, value: str) -> str:
        if not _COMPONENT.match(value):
            raise ValueError(f"{value!r} is neither a built-in name nor an import path "
                             "'package.module:Attr'")
        if "." in value and ":" not in value:
            raise ValueError(f"{value!r}: an import path names its attribute after a colon, "
                             "'package.module:Attr'")
        return value


class ModelConfig(_Component):
    """The host model: a zoo name (`mlp`, `mlp_narrow`, `cnn`, `transformer`; see
    esper.tolaria.models) or `package.module:Attr`, a class or factory called with `kwargs` (and
    with `input_shape` and `out_dim` from the data set when its signature names them).

    `init_from`: a saved model (a run directory, or a `save_model` path) whose host weights the
    new host starts from, instead of its seeded initialisation; parameters the saved host does
    not have (an adapter, say) keep theirs. `freeze`: glob patterns over the host's parameter
    names (`layers.*`, `head.bias`; `*` is all of them): those parameters are not trained, and
    only the rest and the seeds learn."""

    init_from: str | None = None
    freeze: list[str] = Field(default_factory=list)


class DataConfig(_Component):
    """The data set: a built-in name (`mnist1d`, `digits`, `two_spirals`, `teacher_student`; see
    esper.tolaria.data) or `package.module:Attr`, a callable returning the train and validation
    sets. `seed` fixes generation and the validation split (default: the run's seed); the
    training order is shuffled from the run's seed, the same way on every run. `classes` keeps
    only the samples of those classes, in training and validation (a classification data set;
    the model still has an output per class of the whole set): one phase of a continual split."""

    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt | None = None  # default: batch_size
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2  # for data sets without a split of their own
    seed: Seed | None = None
    classes: Annotated[list[NonNegInt], Field(min_length=1)] | None = None


class OptimizerConfig(_Strict):
    """`momentum` and `nesterov` are SGD's, `betas` and `eps` Adam's and AdamW's: giving one a
    value for the other optimizer is an error rather than silently ignored. Seed parameters join the
    same optimizer (with the same settings) when a seed starts to train."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegFloat = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    nesterov: bool = False
    # strict=False: YAML gives a list; the numbers inside stay strict.
    betas: Annotated[tuple[Beta, Beta], Field(strict=False)] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    grad_clip_norm: PositiveFloat | None = None  # clip the global gradient norm; None: no clipping

    @model_validator(mode="after")
    def _options_of_this_optimizer(self) -> Self:
        foreign = {"sgd": ("betas", "eps"), "adam": ("momentum", "nesterov"),
                   "adamw": ("momentum", "nesterov")}[self.name]
        _refuse_foreign(self, foreign, self.name)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


class ScheduleConfig(_Strict):
    """The learning-rate schedule, stepped once per epoch. `cosine` anneals from the optimizer's
    lr to `min_lr` over the run's epochs; `step` multiplies it by `gamma` every `step_size`
    epochs. A rebuilt optimizer (after a germination) keeps the schedule's position."""

    name: Literal["none", "cosine", "step"] = "none"
    min_lr: NonNegFloat = 0.0
    step_size: PositiveInt = 10
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1

    @model_validator(mode="after")
    def _options_of_this_schedule(self) -> Self:
        foreign = {"none": ("min_lr", "step_size", "gamma"), "cosine": ("step_size", "gamma"),
                   "step": ("min_lr",)}[self.name]
        _refuse_foreign(self, foreign, f"schedule {self.name!r}")
        return self


class CheckpointConfig(_Strict):
    """A checkpoint (model, optimizer, scheduler, RNG, Kasmina and Tamiyo state) every
    `every_epochs` epochs, of which the last `keep_last` known-good ones are kept: the ones a
    rollback and `--resume` go back to."""

    every_epochs: PositiveInt = 1
    keep_last: PositiveInt = 3


class RollbackConfig(_Strict):
    """What Tolaria does about divergence. When a run diverges is Tamiyo's call
    (`tamiyo.divergence`, the one place for those thresholds); a corrupt seed state reported by
    Kasmina also asks for one. After `max_rollbacks` rollbacks in one run the run stops with
    an error instead of looping."""

    enabled: bool = True
    max_rollbacks: NonNegInt = 3


class TelemetryConfig(_Strict):
    """What the run reports. Seed health is read from the device once per report (one host sync):
    every `report_every_steps` training steps, or once per epoch when unset. With `bus` on, events
    go to Oona at `redis_url` (default: the command line's `--redis-url`, else the workspace's);
    training goes on when Redis is down. `metrics.jsonl` is written either way."""

    report_every_steps: PositiveInt | None = None
    bus: bool = True
    redis_url: str | None = None

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        """Oona's own rule (`esper.oona.check_url`: the scheme, a host, a port that is a number),
        here rather than as a warning from the bus thread once the run has started."""
        if value is not None:
            from esper.errors import BadInputError
            from esper.oona import check_url  # redis: only for a config that names a URL

            try:
                check_url(value)
            except BadInputError as e:
                raise ValueError(str(e)) from None
        return value


class FaultConfig(_Strict):
    """Faults injected on purpose, to exercise recovery (rollback, resume); empty in real runs.
    `nan_loss_epochs`: the first training step of each listed epoch gets a NaN loss, so the
    weights diverge and Tamiyo asks for an emergency rollback. Each fires once per epoch number:
    the epoch replayed after the rollback trains normally."""

    nan_loss_epochs: list[PositiveInt] = Field(default_factory=list)


class GuardConfig(_Strict):
    """An earlier task the run must not forget (HLD 2.4.4: under 5% degradation on the original
    task). `data` is that task's data section (`classes` names its classes in a continual
    split); only its validation split is read, never trained on: at the run's start (the
    reference), at every epoch end, and, when it reads worse than the reference, with each graft
    that blends and is not yet fossilized disabled in turn. The metric is accuracy read within
    `data.classes` (over every class when it names none), or the loss of a regression. Tamiyo
    culls a graft the degradation can be blamed on (`tamiyo.gates.guard_max_degradation`).

    `distill > 0` also holds grafts off the guarded task's outputs while they learn (Learning
    without Forgetting, Li & Hoiem 2016, on the grafts alone): every training step adds
    `distill * temperature**2 * KL(host || model)` over the guarded classes' softmax at
    `temperature` (a regression: `distill * MSE(model, host)`), where `host` is the same batch
    through the model with every blending graft disabled. It costs one more forward pass a step
    while a graft blends."""

    data: DataConfig
    distill: NonNegFloat = 0.0
    temperature: PositiveFloat = 2.0


class TrainConfig(_Strict):
    """One `esper train` run (DESIGN.md section 12)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = "run"
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    epochs: PositiveInt = 10
    device: str = "auto"
    seed: Seed = 0
    out_dir: str = "runs"  # the run's outputs go to <out_dir>/<run id>/
    kasmina: KasminaConfig = Field(default_factory=KasminaConfig)
    tamiyo: TamiyoConfig = Field(default_factory=TamiyoConfig)
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    guard: GuardConfig | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"{value!r}: expected cpu, cuda, cuda:N or auto")
        return value

    @property
    def data_seed(self) -> int:
        """The seed that generates and splits the data."""
        return self.seed if self.data.seed is None else self.data.seed

    @property
    def tolaria(self) -> TrainConfig:
        """The trainer's part (HLD 9.3.1 `config.tolaria`): the whole run config."""
        return self

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None, source: str = "") -> TrainConfig:
        """Validate a plain mapping (a parsed YAML file, a checkpoint's saved config);
        BadInputError names the first bad field."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise BadInputError(describe_problems(validation_problems(e), source)) from None


# --- YAML -----------------------------------------------------------------------------------

class _YamlLoader(yaml.SafeLoader):
    """SafeLoader, plus floats written without a dot (`1e-3`) and an error on duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 wants a dot and a signed exponent (`1.0e-3`); YAML 1.2 and every user write `1e-3`.
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """Parse YAML text with the config loader (safe: plain data only)."""
    loader = _YamlLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# --- loading --------------------------------------------------------------------------------

def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read, override and validate a run config.

    `overrides` are `dotted.key=value` strings (`optimizer.lr=3e-4`, `kasmina.targets=[conv2d]`);
    each value is read as YAML. The model and data names are resolved and their `kwargs` checked
    against what the built-in or imported component takes, so that a typo fails here, naming the
    file and the field, rather than after the run has started.
    """
    source = os.fspath(path)
    file = Path(path)
    if not file.exists():
        raise NotFoundError(f"{source}: no such config file")
    if not file.is_file():
        raise BadInputError(f"{source}: not a file")
    try:
        data = parse_yaml(file.read_text())
    except UnicodeDecodeError:
        raise BadInputError(f"{source}: not a text file") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInputError(f"{source}: not valid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise BadInputError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInputError(f"{source}: expected a mapping of sections (model, data, ...), "
                            f"found a YAML {type(data).__name__}")
    applied = [apply_override(data, text, source) for text in overrides]
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as e:
        raise BadInputError(describe_problems(validation_problems(e), source, applied)) from None
    problems = _check_components(config)
    if problems:
        raise BadInputError(describe_problems(problems, source, applied))
    return config


def apply_override(data: dict[str, Any], text: str, source: str = "") -> tuple[tuple[str, ...], str]:
    """Set `a.b.c=value` in the raw mapping `data`, creating sections as needed; returns the
    dotted path and the text, for error messages. Unknown keys are caught by validation."""
    where = f"{source}: " if source else ""
    key, sep, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(p.strip() for p in parts):
        raise BadInputError(f"{where}override {text!r}: expected KEY=VALUE with a dotted key, "
                            "e.g. optimizer.lr=3e-4")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise BadInputError(f"{where}override {text!r}: value is not valid YAML: "
                            f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if i == 0 and part in ("model", "data") and isinstance(child, str):
            child = node[part] = {"name": child}  # the `model: mlp` shorthand
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise BadInputError(f"{where}override {text!r}: field '{'.'.join(parts[:i + 1])}' "
                                "is a value, not a section")
        node = child
    node[parts[-1]] = value
    return parts, text


# An error is (location, message); locations are tuples of keys, as pydantic gives them.
_Problem = tuple[tuple[str | int, ...], str]


def validation_problems(e: ValidationError) -> list[_Problem]:
    """Pydantic's errors as (location, message), the messages made to read as config errors."""
    problems: list[_Problem] = []
    for err in e.errors():
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        problems.append((tuple(err["loc"]), msg))
    return problems


def describe_problems(problems: Sequence[_Problem], source: str = "",
                      overrides: Sequence[tuple[tuple[str, ...], str]] = ()) -> str:
    """One line for a BadInputError: the first problem an override caused, else the first one."""

    def culprit(loc: tuple[str | int, ...]) -> str | None:
        for path, text in reversed(overrides):  # the last override of a key is the one in force
            n = min(len(path), len(loc))
            if n and tuple(str(p) for p in loc[:n]) == path[:n]:
                return text
        return None

    loc, msg = next((p for p in problems if culprit(p[0])), problems[0])
    field = ".".join(str(p) for p in loc) or "(root)"
    text = culprit(loc)
    via = f" (from override {text!r})" if text else ""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    where = f"{source}: " if source else ""
    return f"{where}invalid run config: field '{field}'{via}: {msg}{more}"


# --- components: zoo names and import paths ---------------------------------------------------

def resolve_component(name: str, registry: Mapping[str, Any], what: str) -> Any:
    """What a built-in name (in `registry`) or an import path `package.module:Attr` names."""
    if name in registry:
        return registry[name]
    if ":" not in name:
        raise BadInputError(f"unknown {what} {name!r}: built-in {what}s are "
                            f"{', '.join(registry)}; or give an import path 'package.module:Attr'")
    return resolve_import_path(name)


def check_component(name: str, kwargs: Mapping[str, Any], registry: Mapping[str, Any],
                    supplied: Sequence[str], what: str) -> list[_Problem]:
    """Problems with a `{name, kwargs}` section, located under it: a name that does not resolve
    or is not callable, kwargs the callable does not take or (built-ins) of the wrong type."""
    try:
        fn = resolve_component(name, registry, what)
    except BadInputError as e:
        return [(("name",), str(e))]
    if not callable(fn):
        return [(("name",), f"{name!r} is a {type(fn).__name__}, not callable")]
    return [(("kwargs", *loc), msg) for loc, msg in
            check_call(fn, kwargs, supplied, f"{what} {name!r}", typed=name in registry)]


def resolve_import_path(path: str) -> Any:
    """The attribute that `package.module:Attr` names. The current directory is importable, as
    with `python -m`, so a config can name code next to it. A path that does not resolve is a
    BadInputError naming it (callers add the field)."""
    module_name, _, attribute = path.partition(":")
    if not attribute:
        raise BadInputError(f"{path!r} is not an import path 'package.module:Attr'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInputError(f"cannot import {module_name!r} for {path!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed as it ran or compiled
        raise BadInputError(f"cannot import {module_name!r} for {path!r}: it raised "
                            f"{type(e).__name__}: {e}") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BadInputError(f"{path!r}: module {module_name!r} has no attribute "
                                f"{attribute!r}") from None
    return obj


def check_call(fn: Callable[..., Any], kwargs: dict[str, Any], supplied: Sequence[str], what: str,
               *, typed: bool = False) -> list[_Problem]:
    """Problems calling `fn(**kwargs)`, as (location under kwargs, message); the caller passes
    the `supplied` names itself (where `fn` takes them), so `kwargs` may not set them.

    `typed` also validates each value against `fn`'s annotations, strictly (the built-ins,
    whose annotations say what a config may give); an imported callable's annotations are its
    own business, so only the names are checked.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []  # no signature to check against (a C extension); the call will tell
    params = {n: p for n, p in signature.parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    takes = [n for n in params if n not in supplied]
    problems: list[_Problem] = [((k,), f"{what} sets this itself") for k in kwargs if k in supplied]
    if not open_ended:
        problems += [((k,), f"unknown argument of {what} (it takes: {', '.join(takes) or 'none'})")
                     for k in kwargs if k not in params]
    if problems:
        return problems
    if typed:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn, include_extras=True)
        fields: dict[str, Any] = {n: (hints.get(n, Any), ...) for n in kwargs}
        name = f"{getattr(fn, '__name__', 'component')}_kwargs"
        arguments = create_model(name, __config__=_Strict.model_config, **fields)
        try:
            arguments.model_validate(kwargs)
        except ValidationError as e:
            return validation_problems(e)
    try:
        signature.bind(**{n: None for n in supplied if n in params}, **kwargs)
    except TypeError as e:
        return [((), f"{what}: {e}")]
    return []


def _check_components(config: TrainConfig) -> list[_Problem]:
    from esper.tolaria import data, models  # torch: only once the file itself is valid

    problems = [(("model", *loc), msg) for loc, msg in models.check_model_config(config.model)]
    problems += [(("data", *loc), msg) for loc, msg in data.check_data_config(config.data)]
    if config.guard is not None:
        problems += [(("guard", "data", *loc), msg)
                     for loc, msg in data.check_data_config(config.guard.data)]
    return problems

"""The run config of `esper train`: a valid file loads, every bad one fails with one line naming
the file and the field, command-line overrides land where they say (DESIGN.md sections 12, 14)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

from esper.contracts import KernelInterface
from esper.errors import BadInputError, NotFoundError
from esper.tolaria.config import TrainConfig, load_config, parse_yaml

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

MINIMAL = "model: mlp\ndata: {name: two_spirals, kwargs: {n_samples: 200}}\n"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(BadInputError) as info:
        load_config(path, overrides or [])
    message = str(info.value)
    assert "\n" not in message
    assert info.value.exit_code == 2
    return message


# --- valid configs ------------------------------------------------------------------------

def test_minimal_config_takes_the_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.model.name == "mlp" and config.model.kwargs == {}
    assert config.data.name == "two_spirals" and config.data.kwargs == {"n_samples": 200}
    assert config.optimizer.name == "adamw" and config.schedule.name == "none"
    assert config.epochs == 10 and config.device == "auto" and config.seed == 0
    assert config.kasmina.seeds_per_layer == 4 and config.tamiyo.policy == "heuristic"
    assert config.data_seed == 0
    assert config.tolaria is config  # HLD 9.3.1: TolariaTrainer(model, tamiyo, config.tolaria)


def test_full_config_every_section(tmp_path):
    config = load_config(write(tmp_path, """
name: full-run.1
model: {name: cnn, kwargs: {channels: [8, 16], kernel_size: 5}}
data: {name: digits, batch_size: 32, eval_batch_size: 256, val_fraction: 0.25, seed: 7}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5e-4, grad_clip_norm: 1}
schedule: {name: step, step_size: 3, gamma: 0.5}
epochs: 4
device: cuda:1
seed: 3
out_dir: /tmp/runs
kasmina: {targets: [linear, conv2d], exclude: [head], seeds_per_layer: 2}
tamiyo: {max_concurrent: 2, plateau: {patience: 1}, kernel: {grafting_strategy: drift_controlled}}
checkpoints: {every_epochs: 2, keep_last: 5}
rollback: {enabled: false, max_rollbacks: 0}
telemetry: {report_every_steps: 50, bus: false, redis_url: "redis://127.0.0.1:6380/0"}
"""))
    assert config.name == "full-run.1"
    assert config.model.kwargs == {"channels": [8, 16], "kernel_size": 5}
    assert (config.data.batch_size, config.data.eval_batch_size, config.data.val_fraction) == (32, 256, 0.25)
    assert config.data_seed == 7  # data.seed wins over the run's seed
    assert config.optimizer.momentum == 0.9 and config.optimizer.weight_decay == 5e-4
    assert config.optimizer.grad_clip_norm == 1.0
    assert (config.schedule.step_size, config.schedule.gamma) == (3, 0.5)
    assert config.device == "cuda:1" and config.out_dir == "/tmp/runs"
    assert config.kasmina.targets == ["linear", "conv2d"]
    assert config.tamiyo.kernel.grafting_strategy.value == "drift_controlled"
    assert config.checkpoints.keep_last == 5 and not config.rollback.enabled
    assert config.telemetry.report_every_steps == 50 and config.telemetry.bus is False


def test_config_is_frozen_and_survives_a_json_round_trip(tmp_path):
    """A checkpoint stores the config as JSON; reading it back gives the same config."""
    config = load_config(QUICKSTART)
    with pytest.raises(pydantic.ValidationError):
        config.epochs = 3
    assert TrainConfig.from_mapping(config.model_dump(mode="json")) == config


def test_quickstart_loads_and_its_seeds_take_the_forge_configs_kernels():
    """The shipped quickstart validates, and the seed interfaces it wraps are ones the shipped
    forge config compiles, so that the quickstart can germinate."""
    import kasmina
    from esper.tolaria.data import build_data
    from esper.tolaria.models import build_model

    assert QUICKSTART.read_text().startswith("# esper train configs/quickstart.yaml\n")
    config = load_config(QUICKSTART)
    assert config.device == "cpu"
    data = build_data(config.data, seed=config.seed)
    model = build_model(config.model, data.input_shape, data.out_dim)
    _, report = kasmina.wrap(model, config.kasmina)
    assert report.layers
    forge = yaml.safe_load((ROOT / "configs" / "forge.yaml").read_text())
    compiled = {KernelInterface.parse(text) for text in forge["interface"]}
    assert set(report.interfaces) <= compiled


def test_sdk_names_the_same_loader(tmp_path):
    import esper.config

    assert esper.load_config is load_config
    assert esper.config.load_config is load_config and esper.config.TrainConfig is TrainConfig
    assert isinstance(esper.load_config(write(tmp_path, MINIMAL)), TrainConfig)


def test_importing_esper_config_is_light():
    code = "import sys, esper.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


# --- YAML: floats without a dot -------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    ("1e-3", 1e-3), ("1E-3", 1e-3), ("-2.5e+4", -2.5e4), ("3e4", 3e4), (".5e-3", 0.5e-3),
    ("1_000e-3", 1.0), ("1.0e-3", 1e-3), ("0.5", 0.5),
])
def test_exponent_floats_are_floats(text, value):
    assert parse_yaml(f"x: {text}") == {"x": value}


def test_quoted_and_non_numeric_strings_stay_strings():
    assert parse_yaml('a: "1e-3"\nb: e5\nc: 1e\nd: 12') == {"a": "1e-3", "b": "e5", "c": "1e", "d": 12}


def test_lr_written_1e_3_loads(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "optimizer: {lr: 1e-3, weight_decay: 1e-2}\n"))
    assert config.optimizer.lr == 1e-3 and config.optimizer.weight_decay == 1e-2


# --- errors name the file and the field -----------------------------------------------------

@pytest.mark.parametrize(("extra", "field", "reason"), [
    ("optimizer: {lr: 0}", "optimizer.lr", "greater than 0"),
    ("optimizer: {lr: '1e-3'}", "optimizer.lr", "valid number"),
    ("optimizer: {name: lamb}", "optimizer.name", "'sgd', 'adam' or 'adamw'"),
    ("optimizer: {name: adam, momentum: 0.9}", "optimizer", "adam takes no momentum"),
    ("optimizer: {betas: [0.9]}", "optimizer.betas.1", "Field required"),
    ("schedule: {name: cosine, step_size: 3}", "schedule", "takes no step_size"),
    ("epochs: 0", "epochs", "greater than 0"),
    ("epochs: '3'", "epochs", "valid integer"),
    ("seed: true", "seed", "valid integer"),
    ("seed: 99999999999999999999", "seed", "less than 4294967296"),
    ("guard: {data: {name: digits, seed: 4294967296}}", "guard.data.seed", "less than 4294967296"),
    ("optimizer: {lr: .inf}", "optimizer.lr", "finite number"),
    ("tamiyo: {plateau: {min_delta: .inf}}", "tamiyo.plateau.min_delta", "finite number"),
    ("kasmina: {grafting: {max_drift: .inf}}", "kasmina.grafting.max_drift", "finite number"),
    ("device: gpu", "device", "expected cpu, cuda, cuda:N or auto"),
    ("name: 'my run'", "name", "pattern"),
    ("batch_size: 32", "batch_size", "unknown field"),
    ("kasmina: {seeds_per_layer: 3, chunk_width: 4}", "kasmina", "exactly one"),
    ("kasmina: {targets: [conv1d]}", "kasmina.targets.0", "'linear' or 'conv2d'"),
    ("tamiyo: {plateau: {patience: 0}}", "tamiyo.plateau.patience", "greater than 0"),
    ("tamiyo: {divergence: {loss_ratio: 1}}", "tamiyo.divergence.loss_ratio", "greater than 1"),
    ("checkpoints: {keep_last: 0}", "checkpoints.keep_last", "greater than 0"),
    ("rollback: {max_rollbacks: -1}", "rollback.max_rollbacks", "greater than or equal to 0"),
    ("telemetry: {redis_url: 'localhost:6379'}", "telemetry.redis_url", "redis://"),
    ("telemetry: {bus: 1}", "telemetry.bus", "valid boolean"),
    ("guard: {data: imagenet}", "guard.data.name", "unknown data set 'imagenet'"),
    ("guard: {data: {name: digits, kwargs: {seed: 1}}}", "guard.data.kwargs.seed", "sets this itself"),
    ("guard: {}", "guard.data", "Field required"),
    ("tamiyo: {gates: {guard_max_degradation: -0.1}}", "tamiyo.gates.guard_max_degradation",
     "greater than or equal to 0"),
])
def test_bad_values_name_file_and_field(tmp_path, extra, field, reason):
    path = write(tmp_path, MINIMAL + extra + "\n")
    message = error_of(path)
    assert message.startswith(f"{path}: ")
    assert f"field '{field}'" in message
    assert reason in message


@pytest.mark.parametrize(("model", "data", "field", "reason"), [
    ("resnet", "two_spirals", "model.name", "unknown model 'resnet'"),
    ("{name: mlp, kwargs: {width: 8}}", "two_spirals", "model.kwargs.width",
     "it takes: widths, activation, dropout"),
    ("{name: mlp, kwargs: {widths: [8, -1]}}", "two_spirals", "model.kwargs.widths.1", "greater than 0"),
    ("{name: cnn, kwargs: {kernel_size: 4}}", "digits", "model.kwargs.kernel_size", "must be odd"),
    ("{name: mlp, kwargs: {out_dim: 3}}", "two_spirals", "model.kwargs.out_dim", "sets this itself"),
    ("no_such_package.models:Net", "two_spirals", "model.name", "cannot import 'no_such_package.models'"),
    ("os:NoSuchThing", "two_spirals", "model.name", "has no attribute 'NoSuchThing'"),
    ("os.path", "two_spirals", "model.name", "after a colon"),
    ("mlp", "imagenet", "data.name", "unknown data set 'imagenet'"),
    ("mlp", "{name: two_spirals, kwargs: {n_samples: 1.5}}", "data.kwargs.n_samples", "valid integer"),
    ("mlp", "{name: mnist1d, kwargs: {url: x}}", "data.kwargs.url", "unknown argument"),
    ("mlp", "{name: digits, kwargs: {seed: 1}}", "data.kwargs.seed", "sets this itself"),
    ("mlp", "{name: digits, val_fraction: 1.0}", "data.val_fraction", "less than 1"),
    ("mlp", "{name: digits, batch_size: 0}", "data.batch_size", "greater than 0"),
])
def test_bad_components_name_file_and_field(tmp_path, model, data, field, reason):
    path = write(tmp_path, f"model: {model}\ndata: {data}\n")
    message = error_of(path)
    assert message.startswith(f"{path}: ") and f"field '{field}'" in message and reason in message


def test_missing_sections_are_named(tmp_path):
    message = error_of(write(tmp_path, "model: mlp\n"))
    assert "field 'data': Field required" in message
    message = error_of(write(tmp_path, ""))
    assert "field 'model': Field required (and 1 more)" in message


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="nope.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(BadInputError, match="not a file"):
        load_config(tmp_path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "model: mlp\ndata: {name: digits\nepochs: 3\n")
    message = error_of(path)
    assert message.startswith(f"{path}: not valid YAML at line 3")


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, MINIMAL + "epochs: 3\nepochs: 4\n")
    assert error_of(path) == f"{path}: not valid YAML at line 4, column 1: duplicate key 'epochs'"


@pytest.mark.parametrize(("text", "kind"), [("- model\n- data\n", "list"), ("just text\n", "str"),
                                             ("42\n", "int")])
def test_file_that_is_not_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    assert error_of(path) == (f"{path}: expected a mapping of sections (model, data, ...), found a "
                              f"YAML {kind}")


def test_unsafe_yaml_tags_are_refused(tmp_path):
    path = write(tmp_path, MINIMAL + "seed: !!python/object/apply:os.getpid []\n")
    assert "not valid YAML" in error_of(path)


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xff\xfe\x00model")
    assert error_of(path) == f"{path}: not a text file"


# --- overrides ------------------------------------------------------------------------------

def test_overrides_set_nested_values_and_create_sections(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), [
        "optimizer.lr=3e-4", "epochs=2", "tamiyo.plateau.patience=1", "kasmina.targets=[linear, conv2d]",
        "model.kwargs.widths=[16, 8]", "data.kwargs.noise=0.1", "device=cpu", "telemetry.bus=false",
        "name=sweep-1",
    ])
    assert config.optimizer.lr == 3e-4 and config.epochs == 2
    assert config.tamiyo.plateau.patience == 1
    assert config.kasmina.targets == ["linear", "conv2d"]
    assert config.model.kwargs == {"widths": [16, 8]}  # `model: mlp` shorthand expanded
    assert config.data.kwargs == {"n_samples": 200, "noise": 0.1}  # merged into the file's kwargs
    assert config.device == "cpu" and config.telemetry.bus is False and config.name == "sweep-1"


def test_the_last_override_of_a_key_wins(tmp_path):
    assert load_config(write(tmp_path, MINIMAL), ["epochs=2", "epochs=5"]).epochs == 5


def test_override_of_an_unknown_key_names_it(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert error_of(path, ["optimizer.lrr=0.1"]) == (
        f"{path}: invalid run config: field 'optimizer.lrr' (from override 'optimizer.lrr=0.1'): "
        "unknown field")
    assert "field 'nonsense' (from override 'nonsense.deep.key=1'): unknown field" in error_of(
        path, ["nonsense.deep.key=1"])
    assert "field 'model.kwargs.widht' (from override 'model.kwargs.widht=3')" in error_of(
        path, ["model.kwargs.widht=3"])


def test_override_type_errors_name_the_override(tmp_path):
    path = write(tmp_path, MINIMAL)
    message = error_of(path, ["epochs=3", "optimizer.lr=fast"])
    assert message == (f"{path}: invalid run config: field 'optimizer.lr' (from override "
                       "'optimizer.lr=fast'): Input should be a valid number")
    assert "(from override 'epochs=-1'): Input should be greater than 0" in error_of(path, ["epochs=-1"])
    assert "(from override 'seed=1.5')" in error_of(path, ["seed=1.5"])


def test_an_override_error_is_reported_before_a_file_error(tmp_path):
    path = write(tmp_path, MINIMAL + "epochs: 0\n")
    message = error_of(path, ["optimizer.lr=-1"])
    assert "field 'optimizer.lr' (from override 'optimizer.lr=-1')" in message
    assert message.endswith("(and 1 more)")


@pytest.mark.parametrize(("override", "reason"), [
    ("epochs", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("optimizer..lr=1", "expected KEY=VALUE"),
    ("optimizer.lr=[1, 2", "value is not valid YAML"),
])
def test_malformed_overrides(tmp_path, override, reason):
    path = write(tmp_path, MINIMAL)
    message = error_of(path, [override])
    assert message.startswith(f"{path}: override {override!r}: ") and reason in message


def test_override_below_a_value_is_an_error(tmp_path):
    path = write(tmp_path, MINIMAL + "epochs: 3\n")
    assert error_of(path, ["epochs.max=4"]) == (
        f"{path}: override 'epochs.max=4': field 'epochs' is a value, not a section")


def test_override_values_are_yaml(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert load_config(path, ["data.eval_batch_size=null"]).data.eval_batch_size is None
    assert load_config(path, ["rollback.enabled=no"]).rollback.enabled is False
    message = error_of(path, ["optimizer.lr='1e-3'"])  # quoted: a string, refused by the strict schema
    assert "field 'optimizer.lr'" in message and "valid number" in message

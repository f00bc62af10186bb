"""Workspaces with real, VALIDATED kernels and tiny run configs for Tolaria's tests.

Kernels are built through the forge's own path (`catalog_helpers.plant`) and validated by a
report signed with the workspace's bench key, the one road to VALIDATED; the gauntlet itself is
tested with Urabrask.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from catalog_helpers import library_ir, plant

from esper import signing
from esper.contracts import LATENCY_MS, MEMORY_MB, UrabraskValidationReport
from esper.tolaria.config import TrainConfig
from esper.urza import Urza
from esper.workspace import Workspace

ESPER = str(Path(sys.executable).parent / "esper")

# The tiny run's seeds: layers.1 of an MLP 32 -> 32, two seeds of 16 outputs.
INTERFACE = "linear:32:16"


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same dtype, shape and bytes (NaN payloads included: torch.equal says NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().reshape(-1).view(torch.uint8),
                       b.detach().cpu().reshape(-1).view(torch.uint8))


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ bit for bit (or are missing on one side)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not bitwise_equal(a[k], b[k]))


def short_dir(prefix: str) -> Path:
    """A short directory under /tmp: the embedded Redis' Unix socket path has ~107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def validate(urza: Urza, kernel_id: str, latency_ms: float = 0.1) -> None:
    kernel = urza.get_kernel(kernel_id)
    report = UrabraskValidationReport(
        kernel_artifact_id=kernel.id, blueprint_id=kernel.blueprint_id, passed_validation=True,
        benchmark_results={LATENCY_MS: latency_ms, MEMORY_MB: 1.0}, risk_score=0.1)
    urza.apply_validation_report(
        signing.sign(report.to_json().encode(), urza.workspace.private_key("bench"), "bench"),
        actor="test")


def forged_workspace(root: Path, names: tuple[str, ...] = ("mlp_gelu_w8",),
                     interface: str = INTERFACE) -> tuple[Workspace, dict[str, str]]:
    """A workspace whose catalog holds the named standard blueprints, forged (fast pipeline) for
    `interface` and VALIDATED, the first one fastest (so Tamiyo picks it)."""
    ws = Workspace(root / "ws")
    ws.create()
    kernels = {}
    with Urza.open(ws) as urza:
        for i, name in enumerate(names):
            kernels[name] = plant(urza, root, library_ir(name), interface)
            validate(urza, kernels[name], latency_ms=0.1 * (i + 1))
    return ws, kernels


def tiny_config(**overrides: Any) -> TrainConfig:
    """Two spirals, an MLP 2 -> 32 -> 32 -> 2, 7 steps an epoch; Tamiyo sees a plateau at every
    epoch after the first (min_delta is huge) and germinates once; stages last a few steps."""
    config: dict[str, Any] = {
        "name": "tiny", "seed": 0, "device": "cpu", "epochs": 12,
        "model": {"name": "mlp", "kwargs": {"widths": [32, 32]}},
        "data": {"name": "two_spirals", "kwargs": {"n_samples": 512}, "batch_size": 64},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "kasmina": {"include": ["layers.1"], "seeds_per_layer": 2, "stabilization_steps": 3,
                    "embargo_epochs": 2, "telemetry": {"every": 1, "max_rows": None},
                    "training": {"min_steps": 5, "ready_loss_ratio": 0.9},
                    "grafting": {"ramp_length": 7}},
        "tamiyo": {"plateau": {"warmup_epochs": 1, "patience": 1, "min_delta": 10.0},
                   "max_germinations": 1},
        "checkpoints": {"every_epochs": 1, "keep_last": 3},
        "telemetry": {"bus": False},
    }
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return TrainConfig.from_mapping(config)


def reversed_digits(*, seed: int, val_fraction: float):
    """scikit-learn's digits with the labels reversed (y -> 9 - y): a task that contradicts
    `digits`, for a guard that must catch grafts learning it
    (`data.name: tolaria_helpers:reversed_digits`)."""
    from esper.tolaria.data import digits

    bundle = digits(seed=seed, val_fraction=val_fraction)
    return tuple((x, 9 - y) for x, y in (part.tensors for part in (bundle.train, bundle.val)))


def write_config(path: Path, **overrides: Any) -> Path:
    """`tiny_config(**overrides)` as the YAML file `esper train` reads."""
    path.write_text(yaml.safe_dump(tiny_config(**overrides).model_dump(mode="json")))
    return path


def esper(ws: Workspace, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `esper` in a child process on `ws`."""
    return subprocess.run([ESPER, "--workspace", str(ws.root), *args], check=False,
                          capture_output=True, text=True, timeout=timeout)


def signal_mid_epoch(ws: Workspace, config: Path | None, run_id: str, signum: int,
                     epoch: int = 4, *, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """Start `esper train CONFIG --run-id RUN_ID` (no config: `esper train --resume RUN_ID`),
    then `extra`, in a subprocess, let it finish `epoch` epochs (counted from the run's first),
    send `signum` a moment into the next one and wait for it to end: its exit code and stderr.
    The config's epochs must be long enough (steps) for that moment to land inside one."""
    args = ["--resume", run_id] if config is None else [str(config), "--run-id", run_id]
    # SIGINT as a terminal's Ctrl-C finds it: a suite started in the background of a
    # non-interactive shell (`./scripts/test.sh &`) has SIGINT ignored, a child inherits that,
    # and Python then sets no KeyboardInterrupt handler. A handler here is reset by exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([ESPER, "--workspace", str(ws.root), "train", *args, *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    metrics = ws.root / "runs" / run_id / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= epoch:
            break
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail(f"the run never reached epoch {epoch}: {proc.communicate()[1][-2000:]}")
    time.sleep(0.05)  # into the next epoch
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


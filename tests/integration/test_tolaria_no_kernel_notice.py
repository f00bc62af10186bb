"""When Tamiyo finds no kernel for a plateau, `esper train` says why in its one notice: with
VALIDATED kernels in the catalog and a growth budget that none fits, "run `esper forge` and
`esper bench`" would send the user to build kernels that are already there."""

from __future__ import annotations

import shutil

from tolaria_helpers import forged_workspace, short_dir, write_config
from typer.testing import CliRunner

from esper_cli.main import app


def test_a_budget_that_no_kernel_fits_is_named_in_the_notice():
    root = short_dir("nk")
    try:
        ws, _ = forged_workspace(root)
        config = write_config(root / "run.yaml", epochs=3, **{"tamiyo.max_added_parameters": 1})
        result = CliRunner().invoke(app, ["--workspace", str(ws.root), "train", str(config),
                                          "--run-id", "capped"])
        assert result.exit_code == 0, result.output
        [notice] = [line for line in result.stderr.splitlines() if "no VALIDATED kernel" in line]
        assert notice == (
            "no VALIDATED kernel fits a free seed: training goes on without growing "
            "(linear:32:16: 1 VALIDATED kernel(s) within max_risk, none with a measured "
            "parameter count within the 1 parameter(s) left of max_added_parameters=1)")
    finally:
        shutil.rmtree(root, ignore_errors=True)

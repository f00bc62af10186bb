#!/usr/bin/env bash
# Set everything up, then run the quickstart end to end in ./esper-workspace: create the
# workspace and load the standard blueprints, compile them for one seed interface (forge),
# validate a few of the kernels (bench), and query the validated ones as the controller would.
# About two minutes on a 2-core machine after the first set-up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/setup.sh
export ESPER_WORKSPACE=${ESPER_WORKSPACE:-$PWD/esper-workspace}
esper=.venv/bin/esper

$esper library init
$esper library list
$esper forge --once --interface linear:64:16            # fast kernels, one per blueprint
$esper bench --once --max-jobs 4                         # the gauntlet on four of them
$esper library query --interface linear:64:16 --prefer high_speed
$esper library verify

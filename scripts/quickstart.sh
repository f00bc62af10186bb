#!/usr/bin/env bash
# Set everything up, then run the quickstart end to end in ./esper-workspace: create the
# workspace and load the standard blueprints, compile them for one seed interface (forge),
# validate a few of the kernels (bench), query the validated ones as the controller would, then
# train a small model that grows one of them into a layer when its validation loss stalls, and
# print the run's lineage. About two minutes on a 2-core machine after the first set-up.
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
run=quickstart-$(date -u +%Y%m%d-%H%M%S)
$esper train configs/quickstart.yaml --run-id "$run"      # a germination goes through the lifecycle
$esper library lineage "$run"
$esper library verify

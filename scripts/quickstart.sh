#!/usr/bin/env bash
# Set everything up, then run the quickstart end to end in ./esper-workspace:
# create the workspace, load the standard blueprints, list them. About a minute on first run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/setup.sh
export ESPER_WORKSPACE=${ESPER_WORKSPACE:-$PWD/esper-workspace}
esper=.venv/bin/esper

$esper library init
$esper library list
$esper library verify

#!/usr/bin/env bash
# Runs every benchmark; each prints its figures and writes them to
# target/bench-results/<name>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prerequisites.sh
. scripts/fixtures.sh
BANGER_TEST_AGENT=$(scripts/build-agent.sh)
# The previous release's agent, for the protocol-1 comparison.
BANGER_TEST_PREVIOUS_AGENT=$(scripts/previous-agent.sh)
export BANGER_TEST_AGENT BANGER_TEST_PREVIOUS_AGENT
cargo bench --locked --bench store --bench rpc --bench vm --bench guest --bench startup --bench network --bench image --bench disk

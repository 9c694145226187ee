#!/usr/bin/env bash
# Runs every benchmark; each prints its figures and writes them to
# target/bench-results/<name>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/fixtures.sh
cargo bench --locked --bench store --bench rpc --bench vm

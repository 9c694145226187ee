#!/usr/bin/env bash
# The main job on a fresh machine: build banger and run bangerd in the
# foreground (Ctrl-C stops it). Extra arguments go to bangerd.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bins
exec target/release/bangerd "$@"

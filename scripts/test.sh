#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need
# (idempotently), then checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast

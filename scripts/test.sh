#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need
# (idempotently), then checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi

. scripts/prerequisites.sh
. scripts/fixtures.sh
# The guest agent, static, for the guest tests (and the initramfs).
BANGER_TEST_AGENT=$(scripts/build-agent.sh)
# The previous release's agent (protocol 1), for the upgrade test.
BANGER_TEST_PREVIOUS_AGENT=$(scripts/previous-agent.sh)
export BANGER_TEST_AGENT BANGER_TEST_PREVIOUS_AGENT

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked --features fault-injection -- -D warnings
# Tests that cannot run here record why; the runner hides passing tests'
# output, so the reasons are printed after the run.
skipped=target/tmp/skipped-tests.txt
rm -f "$skipped"
status=0
# The fault-injection feature lets the crash-safety tests kill the daemon
# at chosen lifecycle boundaries; release builds never have it.
cargo nextest run --workspace --locked --features fault-injection --no-fail-fast || status=$?
if [ -s "$skipped" ]; then
    echo "Skipped tests (they could not run on this machine):"
    sed 's/^/  /' "$skipped"
fi
exit "$status"

#!/usr/bin/env bash
# Builds banger-agent as one static binary (glibc with crt-static; musl
# targets cannot be installed here) and prints its path. The explicit
# --target keeps the static flag off build scripts and proc macros.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --quiet --release -p banger-agent --target "$target" >&2
agent="$PWD/target/$target/release/banger-agent"
if readelf -l "$agent" | grep -q 'program interpreter'; then
    echo "$agent is not static" >&2
    exit 1
fi
echo "$agent"

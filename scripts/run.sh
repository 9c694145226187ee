#!/usr/bin/env bash
# The main job on a fresh machine: install what banger needs, build it and
# its static guest agent, start bangerd (user mode, in the background),
# import Debian's cloud kernel from its package, build a busybox root disk
# (until OCI images land), boot a VM and run `uname -a` in it through its
# agent. A second run reuses the daemon, kernel, disk and VM it finds.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/prerequisites.sh
cargo build --release --locked --bins
agent=$(scripts/build-agent.sh)
. scripts/fixtures.sh

work="${XDG_STATE_HOME:-$HOME/.local/state}/banger-demo"
mkdir -p "$work"
socket="$work/bangerd.sock"
config="$work/bangerd.toml"
printf '[agent]\nbinary = "%s"\n[firecracker]\nbinary = "%s"\n' \
    "$agent" "$BANGER_TEST_FIRECRACKER" > "$config"
banger() { target/release/banger --socket "$socket" "$@"; }

if ! banger daemon status >/dev/null 2>&1; then
    # Its own session: the daemon outlives this script, as VMs outlive it.
    setsid target/release/bangerd --user --config "$config" --state-dir "$work/state" \
        --socket "$socket" </dev/null >>"$work/bangerd.log" 2>&1 &
    echo $! > "$work/bangerd.pid"
    until banger daemon status >/dev/null 2>&1; do
        kill -0 "$(cat "$work/bangerd.pid")" 2>/dev/null ||
            { echo "bangerd exited; see $work/bangerd.log" >&2; exit 1; }
        sleep 0.1
    done
fi
banger daemon status

banger kernel ls | grep -q '^debian ' ||
    banger kernel import-deb debian "$BANGER_TEST_KERNEL_DEB"
[ -f "$work/busybox.ext4" ] || scripts/busybox-rootfs.sh "$work/busybox.ext4" >/dev/null
banger vm ls | grep -q '^demo ' ||
    banger vm create demo --kernel debian --rootfs "$work/busybox.ext4" --memory 256M
banger vm start demo >/dev/null
banger vm ping demo --wait 120
banger vm exec demo -- uname -a
banger vm ls

cat <<EOF

bangerd runs in the background (pid $(cat "$work/bangerd.pid" 2>/dev/null || echo '?'), log $work/bangerd.log).
Try next:
  alias banger='$PWD/target/release/banger --socket $socket'
  banger vm exec demo -- sh -c 'cat /proc/cpuinfo | head -5'
  echo hello | banger vm exec demo -- cat
  banger vm logs demo --tail 20
  banger vm inspect demo
  banger vm stop demo
EOF

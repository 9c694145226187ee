#!/usr/bin/env bash
# The main job on a fresh machine: build banger, start bangerd, and boot a
# VM on firecracker, then keep the daemon in the foreground (Ctrl-C stops
# the daemon; the VM keeps running, as VMs outlive their daemon).
#
# Until guest kernels can be imported (kernel import-deb), the VM boots the
# 4-byte "halt kernel": it reaches Running and idles, which exercises the
# whole lifecycle without a guest OS.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bins
. scripts/fixtures.sh

work="${XDG_STATE_HOME:-$HOME/.local/state}/banger-demo"
mkdir -p "$work"
socket="$work/bangerd.sock"
config="$work/bangerd.toml"
printf '[firecracker]\nbinary = "%s"\n' "$BANGER_TEST_FIRECRACKER" > "$config"

target/release/bangerd --user --config "$config" --state-dir "$work/state" --socket "$socket" &
daemon=$!
trap 'kill "$daemon" 2>/dev/null || true' INT TERM
banger() { target/release/banger --socket "$socket" "$@"; }
until banger daemon status >/dev/null 2>&1; do
    kill -0 "$daemon" 2>/dev/null || { echo "bangerd exited" >&2; exit 1; }
    sleep 0.1
done
banger daemon status

if [ ! -w /dev/kvm ]; then
    echo "no usable /dev/kvm: not booting a VM" >&2
else
    python3 - "$work/halt.elf" <<'PY'
import struct, sys
code = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp back
header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, 64, 0, 0, 64, 56, 1, 0, 0, 0)
segment = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, 0x1000000, 0x1000000, 4, 4, 0x1000)
image = header + segment
open(sys.argv[1], "wb").write(image + bytes(0x1000 - len(image)) + code)
PY
    truncate -s 64M "$work/rootfs.img"
    banger kernel ls | grep -q '^halt ' || banger kernel import halt --vmlinux "$work/halt.elf"
    banger vm ls | grep -q '^demo ' || banger vm create demo --kernel halt --rootfs "$work/rootfs.img" --memory 128M
    banger vm start demo
    banger vm ls
fi
wait "$daemon"

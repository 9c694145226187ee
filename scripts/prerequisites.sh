# Sourced by scripts/run.sh and scripts/test.sh: installs, once, the Debian
# packages banger uses on a host: QEMU (the backend where KVM cannot boot a
# stock guest), e2fsprogs (mke2fs, debugfs: root disks and agent injection)
# and busybox-static (the demo and test root disk until images land).
banger_packages=(qemu-system-x86 e2fsprogs busybox-static)
banger_missing=()
for package in "${banger_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' ||
        banger_missing+=("$package")
done
if ((${#banger_missing[@]})); then
    as_root=()
    [ "$(id -u)" = 0 ] || as_root=(sudo)
    echo "installing ${banger_missing[*]}" >&2
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${banger_missing[@]}" >/dev/null
fi

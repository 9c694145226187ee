#!/usr/bin/env bash
# Builds a minimal root disk: busybox-static and its applet links in an
# ext4 image made with `mke2fs -d` (no mount, no root needed). banger puts
# its agent in the initramfs, so the image holds no init.
# Usage: scripts/busybox-rootfs.sh OUT.ext4 [SIZE, default 64M]
set -euo pipefail
out=${1:?usage: $0 OUT.ext4 [SIZE]}
size=${2:-64M}
busybox=$(command -v busybox || true)
if [[ -z $busybox ]] || ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
    busybox=/bin/busybox
fi
[[ -x $busybox ]] || { echo "busybox-static is not installed (apt-get install busybox-static)" >&2; exit 1; }

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root}
cp "$busybox" "$staging/bin/busybox"
while read -r applet; do
    [[ $applet == /bin/busybox || -e $staging$applet ]] && continue
    mkdir -p "$staging$(dirname "$applet")"
    ln -s /bin/busybox "$staging$applet"
done < <("$busybox" --list-full | sed 's|^|/|')
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$staging/etc/passwd"
printf 'root:x:0:\n' > "$staging/etc/group"
chmod 1777 "$staging/tmp"
rm -f "$out.partial"
mke2fs -q -F -t ext4 -L rootfs -d "$staging" "$out.partial" "$size"
mv "$out.partial" "$out"
echo "$out"

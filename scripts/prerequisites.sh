# Sourced by scripts/run.sh, scripts/test.sh and scripts/bench.sh. The one
# list of the host programs that banger, its tests, benchmarks and scripts
# run, each with the Debian package that provides it. Packages whose
# programs are missing are installed once; afterwards every program must
# resolve, so a tool added without its package fails here, by name.
# tests/prerequisites.rs checks that every program the Rust code runs is
# listed.
#   program             package          who runs it
banger_programs=(
    "qemu-system-x86_64 qemu-system-x86" # QEMU backend; tests/vm_qemu.rs, benches/guest.rs, run.sh
    "mke2fs             e2fsprogs"       # root disks: busybox-rootfs.sh, tests, benches
    "debugfs            e2fsprogs"       # tests, guest bench: the previous release's agent on its disk
    "e2fsck             e2fsprogs"       # bangerd: vm create --disk checks the clone before growing it; image tests check every written ext4
    "resize2fs          e2fsprogs"       # bangerd: vm create --disk grows the clone's filesystem
    "filefrag           e2fsprogs"       # tests/vm_image.rs: clones share the image's extents
    "mkfs.xfs           xfsprogs"        # tests/vm_image.rs, benches: a reflink-capable state dir
    "depmod             kmod"            # tests/initramfs.rs: a user's initrd with its modules.dep
    "busybox            busybox-static"  # busybox-rootfs.sh: the demo and test root disk
    "cpio               cpio"            # tests/kernel_deb.rs: the initramfs as cpio reads it
    "dpkg-deb           dpkg"            # tests/kernel_deb.rs: modules.builtin from the package
    "tar                tar"             # tests/kernel_deb.rs
    "apt-get            apt"             # fixtures.sh: the Debian cloud kernel package
    "apt-cache          apt"             # fixtures.sh
    "python3            python3"         # fixtures.sh: firecracker from its wheel; network tests: listeners
    "sha256sum          coreutils"       # fixtures.sh
    "readelf            binutils"        # build-agent.sh: the agent must be static
    "file               file"            # busybox-rootfs.sh
    "ip                 iproute2"        # network tests: namespaces, veths, stray taps
    "nft                nftables"        # bangerd: banger's nftables tables; network tests
    "iptables-nft       iptables"        # bangerd: its accepts in iptables-nft's dropping FORWARD chains (Docker's); network tests
    "iptables-nft-restore iptables"      # bangerd: those accepts, in one transaction
    "iptables-nft-save  iptables"        # tests/network.rs: the chain stays saveable
    "unshare            util-linux"      # tests: every test daemon in a network namespace of its own
    "nsenter            util-linux"      # network tests: the daemon in the test's namespace
    "setpriv            util-linux"      # tests/access.rs: a real unprivileged client
    "useradd            passwd"          # tests/access.rs
    "userdel            passwd"          # tests/access.rs
    "groupadd           passwd"          # tests/access.rs
    "groupdel           passwd"          # tests/access.rs
    "sh                 dash"            # tests: `command -v`
    "true               coreutils"       # bangerd: ends what a disk tool run as [host] tool_uid left behind
    "git                git"             # previous-agent.sh: the protocol-1 agent from history
    "debootstrap        debootstrap"     # benches/image.rs: the Debian root filesystem layer
    "gzip               gzip"            # benches/image.rs: the inflate limit
    "du                 coreutils"       # benches/image.rs: sizes of the fixtures
    "umoci              umoci"           # image tests and bench: layouts built and the oracle unpack
    "mount              mount"           # tests/image_import.rs: the image's ext4, read-only
    "umount             mount"           # tests/image_import.rs
    "skopeo             skopeo"          # image tests: OCI layout to docker-archive and OCI archive
)
# Modules the tests import into Debian's own python3 (/usr/bin/python3: a
# python3 earlier in PATH, such as pyenv's, does not see Debian's modules).
#   module              package          who imports it
banger_python_modules=(
    "fusepy             python3-fusepy"  # tests/stalled_reads.rs: a FUSE file whose reads never return
)
banger_missing=()
banger_lookup() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null; }
banger_importable() { [ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import $1" 2>/dev/null; }
for entry in "${banger_programs[@]}"; do
    read -r program package <<<"$entry"
    banger_lookup "$program" || banger_missing+=("$package")
done
for entry in "${banger_python_modules[@]}"; do
    read -r module package <<<"$entry"
    banger_importable "$module" || banger_missing+=("$package")
done
if ((${#banger_missing[@]})); then
    as_root=()
    [ "$(id -u)" = 0 ] || as_root=(sudo)
    mapfile -t banger_missing < <(printf '%s\n' "${banger_missing[@]}" | sort -u)
    echo "installing ${banger_missing[*]}" >&2
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${banger_missing[@]}" >/dev/null
fi
for entry in "${banger_programs[@]}"; do
    read -r program package <<<"$entry"
    banger_lookup "$program" ||
        { echo "$program is still missing after installing $package" >&2; exit 1; }
done
for entry in "${banger_python_modules[@]}"; do
    read -r module package <<<"$entry"
    banger_importable "$module" ||
        { echo "python module $module is still missing after installing $package" >&2; exit 1; }
done

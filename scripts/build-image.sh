#!/usr/bin/env bash
# Builds the `orq` OCI image without Docker: the release binary (stripped) and the few shared
# libraries it links, as one layer, into an OCI image layout.
#
#   scripts/build-image.sh [LAYOUT_DIR] [TAG]
#
# LAYOUT_DIR defaults to $CARGO_TARGET_DIR/oci/orq, TAG to the crate's version. ORQ_BINARY
# names a binary to package instead of building the release one (tests use their debug build).
# Then, on a node:   orq image import LAYOUT_DIR --name orquestra/orq
# or to a registry:  skopeo copy oci:LAYOUT_DIR:TAG docker://REGISTRY/orquestra/orq:TAG
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/orquestra-target}"
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
layout="${1:-$CARGO_TARGET_DIR/oci/orq}"
tag="${2:-$version}"

for tool in umoci ldd strip; do
    command -v "$tool" >/dev/null || {
        echo "build-image: $tool is missing (scripts/install-deps.sh installs it)" >&2
        exit 1
    }
done

binary="${ORQ_BINARY:-}"
if [[ -z "$binary" ]]; then
    cargo build --release -p orq
    binary="$CARGO_TARGET_DIR/release/orq"
fi
[[ -x "$binary" ]] || { echo "build-image: no executable at $binary" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$layout"
mkdir -p "$(dirname "$layout")"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
rootfs="$work/bundle/rootfs"

install -d "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"
strip -o "$rootfs/usr/local/bin/orq" "$binary"
# The dynamic loader and the libraries ldd resolves (glibc, libgcc_s, libm), at their paths.
ldd "$binary" | awk '/=> \// { print $3 } /^\t\/[^ ]*ld-linux/ { print $1 }' |
    while read -r lib; do
        cp --parents -L "$lib" "$rootfs"
    done
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
echo "hosts: files dns" >"$rootfs/etc/nsswitch.conf"

umoci repack --image "$layout:$tag" "$work/bundle" >/dev/null
umoci config --image "$layout:$tag" \
    --config.entrypoint /usr/local/bin/orq \
    --config.cmd operator \
    --config.user 65532:65532 \
    --config.workingdir / \
    --config.env PATH=/usr/local/bin:/usr/bin:/bin \
    --config.label "org.opencontainers.image.title=orq" \
    --config.label "org.opencontainers.image.version=$version" \
    --config.label "org.opencontainers.image.description=Orquestra: the Kubernetes API, controllers and node agent in one binary"
umoci gc --layout "$layout"

size=$(du -sh "$layout" | cut -f1)
echo "built $layout:$tag ($size)"
echo "import on a node:  orq image import $layout --name orquestra/orq"
echo "push to a registry: skopeo copy oci:$layout:$tag docker://REGISTRY/orquestra/orq:$tag"

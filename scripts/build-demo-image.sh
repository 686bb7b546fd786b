#!/usr/bin/env bash
# Builds the quick start's demo image offline, without Docker: busybox-static (from the
# host's busybox-static package) serving /www on port 8080, as an OCI image layout.
#
#   scripts/build-demo-image.sh [LAYOUT_DIR]      (default: /tmp/orquestra-demo-image)
#
# Then: orq image import LAYOUT_DIR --name demo/web   →   image demo/web:v1
set -euo pipefail

layout="${1:-/tmp/orquestra-demo-image}"
tag=v1
busybox=/bin/busybox
command -v umoci >/dev/null || {
    echo "build-demo-image: umoci is missing (scripts/install-deps.sh installs it)" >&2
    exit 1
}
# A static busybox: the image has no libraries.
if ldd "$busybox" >/dev/null 2>&1; then
    echo "build-demo-image: $busybox is not busybox-static (apt-get install busybox-static)" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$layout"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
rootfs="$work/bundle/rootfs"
mkdir -p "$rootfs/bin" "$rootfs/www" "$rootfs/tmp" "$rootfs/etc"
cp "$busybox" "$rootfs/bin/busybox"
for applet in sh httpd echo sleep cat ls env hostname nc wget nslookup printf date; do
    ln -s busybox "$rootfs/bin/$applet"
done
cat >"$rootfs/www/index.html" <<'HTML'
hello from orquestra
HTML
cat >"$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/:/bin/false
PASSWD
umoci repack --image "$layout:$tag" "$work/bundle" >/dev/null
umoci config --image "$layout:$tag" \
    --config.env PATH=/bin \
    --config.cmd httpd --config.cmd -f --config.cmd -v --config.cmd -p --config.cmd 8080 \
    --config.cmd -h --config.cmd /www
umoci gc --layout "$layout"
echo "built $layout:$tag — import it with: orq image import $layout --name demo/web"

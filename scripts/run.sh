#!/usr/bin/env bash
# The run command: builds `orq` (release), links it as /usr/local/bin/orq, and starts the
# all-in-one server in the foreground on the embedded SQLite store. Extra arguments go to
# `orq server` (see `orq server --help`). ORQ_BINARY runs that binary instead of building
# (the quick-start test uses its debug build).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
if [[ -n "${ORQ_BINARY:-}" ]]; then
    binary="$ORQ_BINARY"
else
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/orquestra-target}"
    cargo build --release -p orq
    binary="$CARGO_TARGET_DIR/release/orq"
    ln -sf "$binary" /usr/local/bin/orq
fi
exec "$binary" server "$@"

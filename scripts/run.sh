#!/usr/bin/env bash
# The run command: builds `orq` (release) and starts the all-in-one server in the foreground
# on the embedded SQLite store. Extra arguments go to `orq server` (see `orq server --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/orquestra-target}"
cargo build --release -p orq
exec "$CARGO_TARGET_DIR/release/orq" server "$@"

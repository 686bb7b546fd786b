#!/usr/bin/env bash
# The test command: installs what the tests need, checks formatting and lints, then runs every
# test tier (unit, in-process, real SQLite, real etcd, real child processes) with nextest.
# Extra arguments go to `cargo nextest run` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# One target directory shared by every run on this machine, so reruns are incremental.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/orquestra-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== self-contained"
# A user's clone has nothing beside it: no build, test or script may read outside the repository.
if git grep -nE '\.\./shared|shared/(design|conformance)' -- . ':!scripts/test.sh'; then
  echo "test.sh: the files above refer to a shared/ directory outside the repository" >&2
  exit 1
fi
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings
echo "== doc tests"
cargo test --workspace --all-features --doc --quiet
echo "== tests"
cargo nextest run --workspace --all-features --no-fail-fast "$@"

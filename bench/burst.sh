#!/usr/bin/env bash
# The large-frame burst (BENCHMARKS.md, "Large-frame burst"): starts the release echo
# example, runs `khived-bench burst` against it, prints the server's RSS before, at its peak
# and after, then stops the server.
#
#   bash bench/burst.sh                           # 40 clients x 2 pipelined 4 MiB requests
#   bash bench/burst.sh --leave                   # clients close without reading
#   BURST_BUILD=no bash bench/burst.sh --clients 100
#
# Arguments are passed to `khived-bench burst` (see `khived-bench --help`). Environment:
# BURST_BUILD (yes; "no" skips the release build), and the daemon's own KHIVE_* variables.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
if [ "${BURST_BUILD:-yes}" != no ]; then
    cargo build --release -p khived --example echo
    cargo build --release -p khived-bench
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/khived-burst.XXXXXX")
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

chmod 700 "$work"
KHIVE_SOCKET=$work/echo.sock KHIVE_PID=$work/echo.pid \
    "$target/release/examples/echo" 2>"$work/echo.log" &
server_pid=$!
for _ in $(seq 100); do
    [ -S "$work/echo.sock" ] && break
    sleep 0.1
done
[ -S "$work/echo.sock" ] || { cat "$work/echo.log"; echo "echo did not start" >&2; exit 1; }
# Let the daemon settle (its first allocations) before the "before" figure is taken.
sleep 1
echo "== echo pid $server_pid, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$target/release/khived-bench" burst --socket "$work/echo.sock" --pid "$server_pid" "$@"

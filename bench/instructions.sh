#!/usr/bin/env bash
# User-space instructions a request costs the server, as callgrind counts them (every thread
# of the server): examples/echo of this checkout, of an earlier commit, and khived-bench's
# blocking baseline (2 threads one-shot, a thread per client persistent), for one client and
# for eight, one-shot and persistent. A count, not a time: a request path's work counts the
# same however busy the machine is, so it shows what a change saves where rates are noise.
# (A connection's failed reads while it waits for the next request depend on timing, so the
# one-client figures move with the machine; kernel time is not in it, bench/syscalls.sh
# counts the system calls.)
#
#   bash bench/instructions.sh                     # 1 round of 20,000 requests per scenario
#   PREV=8ab1465 ROUNDS=3 bash bench/instructions.sh
#
# Environment: ROUNDS (1), REQUESTS per run (20000), PREV a git revision whose examples/echo
# is counted too (default: HEAD~1 of the checkout; "none" skips it), SCENARIOS (MODE:CLIENTS
# pairs, default "one-shot:1 persistent:1 one-shot:8 persistent:8"), BENCH_OUT (write the
# medians as JSON lines). Needs valgrind (callgrind and callgrind_control).
set -euo pipefail

ROUNDS=${ROUNDS:-1}
REQUESTS=${REQUESTS:-20000}
PREV=${PREV:-HEAD~1}
SCENARIOS=${SCENARIOS:-one-shot:1 persistent:1 one-shot:8 persistent:8}
BENCH_OUT=${BENCH_OUT:-}
WORK_NAME=khived-instructions
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if ! command -v callgrind_control >/dev/null; then
    echo "valgrind's callgrind is missing (apt-get install valgrind)" >&2
    exit 1
fi

build_echo_servers
echo "== khived $commit; $ROUNDS round(s) x $REQUESTS requests; $(busy)"

# Runs one counted load against server $1 in mode $2 with $3 clients; prints the
# instructions a request and the rate under callgrind (slow: only a sanity check).
count() {
    local dir socket line total
    dir=$(mktemp -d "$work/$1.XXXX")
    socket=$dir/s.sock
    local grind=(valgrind --tool=callgrind "--callgrind-out-file=$dir/out")
    case $1 in
    echo) KHIVE_SOCKET=$socket KHIVE_PID=$dir/s.pid "${grind[@]}" "$target/release/examples/echo" 2>"$dir/log" & ;;
    prev) KHIVE_SOCKET=$socket KHIVE_PID=$dir/s.pid "${grind[@]}" "$prev_bin" 2>"$dir/log" & ;;
    baseline)
        local threads=2
        if [ "$2" = persistent ] && [ "$3" -gt 2 ]; then threads=$3; fi
        "${grind[@]}" "$bench" baseline --socket "$socket" --threads "$threads" 2>"$dir/log" &
        ;;
    esac
    server_pid=$!
    await_server "$1"
    "$bench" load --socket "$socket" --requests 200 --concurrency "$3" --mode "$2" --timeout 60 >/dev/null
    # Only the measured load is counted: zeroed after the warm-up, dumped before the stop.
    callgrind_control -z "$server_pid" >/dev/null 2>&1
    line=$("$bench" load --socket "$socket" --requests "$REQUESTS" --concurrency "$3" --mode "$2" --timeout 600 | tail -1)
    callgrind_control -d "$server_pid" >/dev/null 2>&1
    stop_server
    total=$(awk '/^summary:/ {print $2; exit}' "$dir/out.1")
    echo "$(awk -v t="$total" -v n="$REQUESTS" 'BEGIN {printf "%.0f", t / n}') $(json_field rps "$line")"
}

for scenario in $SCENARIOS; do
    mode=${scenario%%:*}
    clients=${scenario##*:}
    echo "== $mode, $clients client(s): instructions a request (rps under callgrind)"
    run_rounds "$mode" "$clients"
    for server in $servers; do
        instructions=$(awk -v s="$server" '$1 == s {print $2}' "$work/results" | median_of)
        printf '%-9s median: %s instructions a request\n' "$server" "$instructions"
        out "{\"kind\":\"instructions\",\"server\":\"$server\",\"mode\":\"$mode\",\"clients\":$clients,\"instructions_per_request\":$instructions,\"commit\":\"$commit\"}"
    done
done

#!/usr/bin/env bash
# System calls a request costs the server, as the kernel counts them (`perf stat` on the
# server's tracepoints, every thread): examples/echo of this checkout, of an earlier commit,
# and khived-bench's blocking baseline (2 threads one-shot, a thread per client persistent),
# for one client and for eight, one-shot and persistent. Also prints each run's rate and median latency, which on a shared machine
# move more than the counts do.
#
#   bash bench/syscalls.sh                      # 3 rounds of 20,000 requests per scenario
#   PREV=2983d56 ROUNDS=5 bash bench/syscalls.sh
#
# Environment: ROUNDS (3), REQUESTS per run (20000), PREV a git revision whose examples/echo
# is counted too (default: HEAD~1 of the checkout; "none" skips it), SCENARIOS (MODE:CLIENTS
# pairs, default "one-shot:1 persistent:1 one-shot:8 persistent:8"), BENCH_OUT (write the
# medians as JSON lines). Needs `perf` with access to the syscall tracepoints (as root, or
# with kernel.perf_event_paranoid at -1).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-20000}
PREV=${PREV:-HEAD~1}
SCENARIOS=${SCENARIOS:-one-shot:1 persistent:1 one-shot:8 persistent:8}
BENCH_OUT=${BENCH_OUT:-}
WORK_NAME=khived-syscalls
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if ! perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
    echo "perf cannot count syscall tracepoints here (install linux-perf; run as root)" >&2
    exit 1
fi

build_echo_servers
echo "== khived $commit; $ROUNDS rounds x $REQUESTS requests; $(busy)"

calls="accept4 getsockopt read recvfrom sendto close epoll_ctl epoll_pwait timerfd_settime futex"
events=raw_syscalls:sys_enter
for call in $calls; do events="$events,syscalls:sys_enter_$call"; done

# Runs one counted load against server $1 in mode $2 with $3 clients; prints
# "rps p50 total call=count..." per request.
count() {
    local dir socket line stat perf_pid
    dir=$(mktemp -d "$work/$1.XXXX")
    socket=$dir/s.sock
    case $1 in
    echo) KHIVE_SOCKET=$socket KHIVE_PID=$dir/s.pid "$target/release/examples/echo" 2>"$dir/log" & ;;
    prev) KHIVE_SOCKET=$socket KHIVE_PID=$dir/s.pid "$prev_bin" 2>"$dir/log" & ;;
    baseline)
        local threads=2
        if [ "$2" = persistent ] && [ "$3" -gt 2 ]; then threads=$3; fi
        "$bench" baseline --socket "$socket" --threads "$threads" 2>"$dir/log" &
        ;;
    esac
    server_pid=$!
    await_server "$1"
    "$bench" load --socket "$socket" --requests 100 --concurrency 1 --timeout 10 >/dev/null
    perf stat -x, -e "$events" -p "$server_pid" -o "$dir/stat" &
    perf_pid=$!
    sleep 0.3 # perf attaches
    line=$("$bench" load --socket "$socket" --requests "$REQUESTS" --concurrency "$3" --mode "$2" | tail -1)
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    stop_server
    stat=$(awk -F, -v n="$REQUESTS" '$3 ~ /sys_enter/ {
        name = $3; sub(/.*sys_enter_?/, "", name); if (name == "") name = "total"
        printf "%s=%.2f ", name, $1 / n }' "$dir/stat")
    echo "$(json_field rps "$line") $(json_field p50_us "$line") $stat"
}

for scenario in $SCENARIOS; do
    mode=${scenario%%:*}
    clients=${scenario##*:}
    echo "== $mode, $clients client(s): rps, p50 us, system calls a request"
    run_rounds "$mode" "$clients"
    for server in $servers; do
        total=$(awk -v s="$server" '$1 == s { for (i = 4; i <= NF; i++) if ($i ~ /^total=/) { sub(/total=/, "", $i); print $i } }' "$work/results" | median_of)
        rps=$(awk -v s="$server" '$1 == s {print $2}' "$work/results" | median_of)
        p50=$(awk -v s="$server" '$1 == s {print $3}' "$work/results" | median_of)
        printf '%-9s median: %s system calls a request, %s rps, p50 %s us\n' "$server" "$total" "$rps" "$p50"
        out "{\"kind\":\"syscalls\",\"server\":\"$server\",\"mode\":\"$mode\",\"clients\":$clients,\"syscalls_per_request\":$total,\"rps\":$rps,\"p50_us\":$p50,\"commit\":\"$commit\"}"
    done
done

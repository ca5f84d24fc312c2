#!/usr/bin/env bash
# Dispatch on every core: measures khived's examples/compute (a dispatcher that computes
# inline) against khived-bench's plain-threads baseline doing the same work, the head-of-line
# figures (short requests and probes beside 100 ms computations), the echo one-shot figures
# side by side with an earlier commit, and thread counts busy and idle.
#
#   bash bench/cores.sh                         # 3 rounds of 5 s per scenario
#   PREV=9de69a8 ROUNDS=5 BENCH_OUT=cores.jsonl bash bench/cores.sh   # against that commit
#
# Environment: ROUNDS (3), DURATION seconds per round (5), CONCURRENCY (8), WORK_US CPU work
# per compute request (200), SLOW_US the slow requests of the head-of-line scenarios (100000),
# BASE_THREADS baseline pool (nproc, the number of cores khived uses by default), PREV a git
# revision whose examples/echo runs in alternation with this one's (default: HEAD~1 of the
# checkout; "none" skips it), IDLE_WAIT seconds before idle threads are counted (15),
# SCENARIOS (a subset of "compute short probes crowd echo idle", all by default), BENCH_OUT (write
# the summary as JSON lines), TOKIO=1 (also run bench/tokio-ref, the wire format served as
# the original tokio runtime served it, in the compute and head-of-line scenarios; built with
# its own lock file, in a workspace of its own, fetching tokio from crates.io the first
# time). Servers run in alternation, each started fresh for a round. Run it on a quiet
# machine: other work shows in every figure.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONCURRENCY=${CONCURRENCY:-8}
WORK_US=${WORK_US:-200}
SLOW_US=${SLOW_US:-100000}
BASE_THREADS=${BASE_THREADS:-$(nproc)}
PREV=${PREV:-HEAD~1}
IDLE_WAIT=${IDLE_WAIT:-15}
SCENARIOS=${SCENARIOS:-compute short probes crowd echo idle}
BENCH_OUT=${BENCH_OUT:-}
TOKIO=${TOKIO:-}
WORK_NAME=khived-cores
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

echo "== building (release)"
cargo build --release -p khived --example echo --example compute
cargo build --release -p khived-bench
echo_bin=$target/release/examples/echo
compute_bin=$target/release/examples/compute
bench=$target/release/khived-bench
tokio_bin=""
if [ -n "$TOKIO" ]; then
    echo "== building bench/tokio-ref"
    CARGO_TARGET_DIR=$target/tokio-ref cargo build -q --release --locked \
        --manifest-path bench/tokio-ref/Cargo.toml
    tokio_bin=$target/tokio-ref/release/khived-tokio-ref
fi

build_prev_echo

describe_machine
echo "== khived $commit; $ROUNDS rounds x ${DURATION}s, $CONCURRENCY clients, work ${WORK_US} us, slow ${SLOW_US} us"

threads_of() {
    awk '/^Threads:/ {print $2}' "/proc/$1/status"
}

# Until killed, keeps the maximum thread count of process $1 in file $2.
sample_max() {
    local max=0 now
    while now=$(threads_of "$1" 2>/dev/null); do
        ((now > max)) && max=$now
        echo "$max" >"$2.new" && mv "$2.new" "$2"
        sleep 0.1
    done
}

# Starts server $1 (khived, khived1 = one thread, prev, baseline, tokio); sets server_pid, socket, dir.
start_server() {
    dir=$(mktemp -d "$work/$1.XXXX")
    socket=$dir/s.sock
    case $1 in
    khived) KHIVE_SOCKET=$socket KHIVE_PID=$dir/s.pid "$compute_bin" 2>"$dir/log" & ;;
    khived1) KHIVE_THREADS=1 KHIVE_SOCKET=$socket KHIVE_PID=$dir/s.pid "$compute_bin" 2>"$dir/log" & ;;
    echo) KHIVE_SOCKET=$socket KHIVE_PID=$dir/s.pid "$echo_bin" 2>"$dir/log" & ;;
    prev) KHIVE_SOCKET=$socket KHIVE_PID=$dir/s.pid "$prev_bin" 2>"$dir/log" & ;;
    baseline) "$bench" baseline --socket "$socket" --threads "$BASE_THREADS" 2>"$dir/log" & ;;
    tokio) KHIVE_SOCKET=$socket "$tokio_bin" 2>"$dir/log" & ;;
    esac
    server_pid=$!
    await_server "$1"
}



load_before=$(busy)
echo "== before the rounds: $load_before"

results=$work/results # scenario server round rps p50 p99 max errors busy_threads
: >"$results"

# round SCENARIO SERVER ROUND LOAD-ARGS...
round() {
    local scenario=$1 server=$2 n=$3
    shift 3
    start_server "$server"
    sleep 0.5
    echo 0 >"$dir/max"
    sample_max "$server_pid" "$dir/max" &
    sampler_pid=$!
    "$bench" load --socket "$socket" --duration "$DURATION" "$@" >"$dir/load"
    kill "$sampler_pid"
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=""
    local threads
    threads=$(cat "$dir/max")
    stop_server
    local line row
    line=$(tail -n 1 "$dir/load")
    row=("$scenario" "$server" "$n")
    for field in rps p50_us p99_us max_us errors; do
        row+=("$(json_field "$field" "$line")")
    done
    row+=("$threads")
    echo "${row[*]}" >>"$results"
    printf '%-10s %-9s round %s: %9s rps  p50 %9s us  p99 %9s us  errors %s  busy threads %s\n' \
        "$scenario" "$server" "$n" "${row[3]}" "${row[4]}" "${row[5]}" "${row[7]}" "$threads"
}

wants() { [[ " $SCENARIOS " == *" $1 "* ]]; }
for n in $(seq "$ROUNDS"); do
    if wants compute; then
        for server in khived baseline ${tokio_bin:+tokio}; do
            round compute "$server" "$n" --concurrency "$CONCURRENCY" --work-us "$WORK_US"
        done
    fi
    for server in khived khived1 ${tokio_bin:+tokio}; do
        # Short requests from 7 clients beside one client's long computations.
        if wants short; then
            round short "$server" "$n" --concurrency $((CONCURRENCY - 1)) \
                --background 1 --background-work-us "$SLOW_US"
        fi
        # Probes beside two long computations.
        if wants probes; then
            round probes "$server" "$n" --concurrency 2 --probe \
                --background 2 --background-work-us "$SLOW_US"
        fi
        # Short requests beside as many long computations as there are dispatch threads,
        # each starting again as soon as it ends: every slot is taken.
        if wants crowd; then
            round crowd "$server" "$n" --concurrency $((CONCURRENCY - BASE_THREADS)) \
                --background "$BASE_THREADS" --background-work-us "$SLOW_US"
        fi
    done
    if [ -n "$prev_bin" ] && wants echo; then
        for server in echo prev; do
            round echo "$server" "$n" --concurrency "$CONCURRENCY"
        done
    fi
done

# Idle threads: after a burst of compute work, the daemon gives its extra threads back.
idle_threads=n/a
if wants idle; then
    start_server khived
    "$bench" load --socket "$socket" --duration 2 --concurrency "$CONCURRENCY" \
        --work-us "$WORK_US" >/dev/null
    after_load=$(threads_of "$server_pid")
    sleep "$IDLE_WAIT"
    idle_threads=$(threads_of "$server_pid")
    stop_server
    echo "compute daemon threads: $after_load right after a 2 s burst, $idle_threads after ${IDLE_WAIT}s idle"
fi

load_after=$(busy)
echo "== after the rounds: $load_after"

median() { # SCENARIO SERVER COLUMN
    awk -v s="$1" -v v="$2" -v c="$3" '$1 == s && $2 == v {print $c}' "$results" |
        sort -g |
        awk '{v[NR] = $1} END {
            if (NR == 0) print "n/a"
            else if (NR % 2) print v[(NR + 1) / 2]
            else print (v[NR / 2] + v[NR / 2 + 1]) / 2
        }'
}
if [ -n "$BENCH_OUT" ]; then : >"$BENCH_OUT"; fi
out "{\"kind\":\"run\",\"script\":\"cores\",\"date\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\"commit\":\"$commit\",\"prev\":\"${prev_rev:-none}\",\"nproc\":$(nproc),\"rounds\":$ROUNDS,\"duration_s\":$DURATION,\"concurrency\":$CONCURRENCY,\"work_us\":$WORK_US,\"slow_us\":$SLOW_US,\"baseline_threads\":$BASE_THREADS,\"before\":\"$load_before\",\"after\":\"$load_after\"}"

echo
echo "== summary: medians of $ROUNDS rounds"
printf '%-34s %12s %12s %8s\n' metric a b "a/b"
row() { # label a b
    local r
    r=$(ratio "$2" "$3")
    printf '%-34s %12s %12s %8s\n' "$1" "$2" "$3" "$r"
    out "{\"kind\":\"metric\",\"metric\":\"$1\",\"a\":$(json_value "$2"),\"b\":$(json_value "$3"),\"ratio\":$(json_value "$r")}"
}
echo "compute ${WORK_US} us: a = khived, b = baseline ($BASE_THREADS threads)"
row "compute rps" "$(median compute khived 4)" "$(median compute baseline 4)"
row "compute p50 us" "$(median compute khived 5)" "$(median compute baseline 5)"
row "compute p99 us" "$(median compute khived 6)" "$(median compute baseline 6)"
row "compute busy threads" "$(median compute khived 9)" "$(median compute baseline 9)"
echo "head-of-line: a = khived, b = khived with KHIVE_THREADS=1"
row "short beside 1 slow: p99 us" "$(median short khived 6)" "$(median short khived1 6)"
row "short beside 1 slow: rps" "$(median short khived 4)" "$(median short khived1 4)"
row "probes beside 2 slow: p99 us" "$(median probes khived 6)" "$(median probes khived1 6)"
row "probes beside 2 slow: max us" "$(median probes khived 7)" "$(median probes khived1 7)"
row "short beside $BASE_THREADS slow: p99 us" "$(median crowd khived 6)" "$(median crowd khived1 6)"
if [ -n "$tokio_bin" ]; then
    echo "the tokio reference: a = khived, b = bench/tokio-ref"
    row "compute rps" "$(median compute khived 4)" "$(median compute tokio 4)"
    row "compute p99 us" "$(median compute khived 6)" "$(median compute tokio 6)"
    row "compute busy threads" "$(median compute khived 9)" "$(median compute tokio 9)"
    row "short beside 1 slow: p99 us" "$(median short khived 6)" "$(median short tokio 6)"
    row "probes beside 2 slow: p99 us" "$(median probes khived 6)" "$(median probes tokio 6)"
fi
if [ -n "$prev_bin" ]; then
    echo "echo one-shot: a = this commit, b = $PREV ($prev_rev)"
    row "echo one-shot rps" "$(median echo echo 4)" "$(median echo prev 4)"
    row "echo one-shot p99 us" "$(median echo echo 6)" "$(median echo prev 6)"
    row "echo busy threads" "$(median echo echo 9)" "$(median echo prev 9)"
fi

echo
echo "== goals"
goal "compute rps, khived / baseline" \
    "$(ratio "$(median compute khived 4)" "$(median compute baseline 4)")" ">=" 0.95
goal "compute p99, khived / baseline" \
    "$(ratio "$(median compute khived 6)" "$(median compute baseline 6)")" "<=" 1.1
goal "short requests beside a slow one, p99 us" "$(median short khived 6)" "<=" 5000
goal "probes beside two slow ones, p99 us" "$(median probes khived 6)" "<=" 5000
goal "short beside $BASE_THREADS slow ones (every slot), p99 us" "$(median crowd khived 6)" "<=" 5000
if [ -n "$prev_bin" ]; then
    goal "echo one-shot rps, this / previous" \
        "$(ratio "$(median echo echo 4)" "$(median echo prev 4)")" ">=" 0.95
    goal "echo one-shot p99, this / previous" \
        "$(ratio "$(median echo echo 6)" "$(median echo prev 6)")" "<=" 1.05
fi
goal "idle threads after ${IDLE_WAIT}s" "$idle_threads" "<=" 2
if [ -n "$BENCH_OUT" ]; then echo "(summary written to $BENCH_OUT)"; fi

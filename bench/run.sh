#!/usr/bin/env bash
# Compares khived's examples/echo with khived-bench's plain-threads baseline and with its
# bare epoll loop (one thread, no executor: the least an event loop costs), and measures what
# khived costs in binary size, crates and memory. Prints a summary with PASS/MISS per goal.
#
#   bash bench/run.sh                      # 3 rounds of 5 s per server and mode
#   ROUNDS=5 DURATION=10 BENCH_OUT=bench.jsonl bash bench/run.sh
#
# Environment: ROUNDS (3), DURATION seconds per round (5), CONCURRENCY (8), PAYLOAD bytes (64),
# BASE_THREADS baseline pool in one-shot mode (2), BENCH_OUT (write the summary as JSON lines),
# CORES=0 to skip bench/cores.sh, which runs at the end (compute-bound dispatch, head-of-line,
# echo against the previous commit PREV, default HEAD~1; see its header).
#
#   TOKIO=1 PREV=b27ae51 ROUNDS=5 DURATION=5 BENCH_OUT=bench.jsonl bash bench/run.sh
#                                      # the last recorded run (BENCHMARKS.md); TOKIO and PREV
#                                      # are cores.sh's
# Servers run in alternation (khived, baseline, khived, ...), each started fresh for a round,
# so that drift on the machine (other builds, thermal) hits both alike.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONCURRENCY=${CONCURRENCY:-8}
PAYLOAD=${PAYLOAD:-64}
BASE_THREADS=${BASE_THREADS:-2}
# A blocking server serves one connection per thread: with fewer threads than persistent
# clients, the others would wait for the whole round. So persistent mode gets one per client.
BASE_THREADS_PERSISTENT=$CONCURRENCY
BENCH_OUT=${BENCH_OUT:-}
WORK_NAME=khived-bench
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------------------- build
echo "== building (release)"
cargo build --release -p khived --example echo
cargo build --release -p khived-bench
khived_built=yes
cargo build --release -p khived --bin khived || khived_built=no
echo_bin=$target/release/examples/echo
bench=$target/release/khived-bench

describe_machine
echo "== khived $commit; $ROUNDS rounds x ${DURATION}s, $CONCURRENCY clients, $PAYLOAD-byte payload"

# ---------------------------------------------------------------------------- sizes
stripped_size() {
    cp "$1" "$work/stripped"
    strip "$work/stripped"
    stat -c %s "$work/stripped"
}

# Crates in the dependency graph of khived, khived itself not counted.
crate_count() {
    cargo tree -q -p khived -e normal --prefix none "$@" |
        awk 'NF >= 2 && $1 != "khived" {print $1, $2}' | sort -u | wc -l
}

echo "== sizes"
echo_size=$(stripped_size "$echo_bin")
khived_size=n/a
if [ "$khived_built" = yes ]; then khived_size=$(stripped_size "$target/release/khived"); fi
crates_default=$(crate_count)
crates_minimal=$(crate_count --no-default-features)

# What an embedder pays: a minimal smol-style program, with and without a daemon in it.
# Built outside the workspace against this checkout, with the repository's release profile
# and lock file so that versions and settings match.
embed=$work/embed
mkdir -p "$embed/plain/src" "$embed/served/src"
profile=$(awk '/^\[profile\.release\]/ {p = 1; print; next} /^\[/ {p = 0} p' Cargo.toml)
cat >"$embed/Cargo.toml" <<EOF
[workspace]
members = ["plain", "served"]
resolver = "2"

${profile:-[profile.release]}
EOF
cp Cargo.lock "$embed/Cargo.lock"
for member in plain served; do
    cat >"$embed/$member/Cargo.toml" <<EOF
[package]
name = "$member"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
async-io = "2"
EOF
done
echo "khived = { path = \"$root\", default-features = false }" >>"$embed/served/Cargo.toml"
common='use std::time::Duration;

// Something trivial that still goes through the reactor, so nothing is optimized away.
async fn trivial(n: usize) -> usize {
    async_io::Timer::after(Duration::from_millis(1)).await;
    n * 2
}
'
cat >"$embed/plain/src/main.rs" <<EOF
$common
fn main() {
    println!("{}", async_io::block_on(trivial(std::env::args().count())));
}
EOF
cat >"$embed/served/src/main.rs" <<EOF
$common
struct Echo;

impl khived::Dispatch for Echo {
    async fn dispatch(
        &self,
        request: &khived::Request<'_>,
    ) -> Result<String, khived::DispatchError> {
        Ok(request.ops.to_string())
    }

    fn namespace(&self) -> &str {
        "echo"
    }

    fn config_id(&self) -> &str {
        ""
    }
}

fn main() {
    println!("{}", async_io::block_on(trivial(std::env::args().count())));
    match khived::Daemon::new(khived::Config::from_env(), Echo).run_blocking() {
        Ok(stopped) => std::process::exit(stopped.exit_code().into()),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
EOF
embed_plain=n/a
embed_served=n/a
echo "== building the embedder programs in $embed"
if CARGO_TARGET_DIR=$embed/target cargo build -q --release --workspace \
    --manifest-path "$embed/Cargo.toml"; then
    embed_plain=$(stripped_size "$embed/target/release/plain")
    embed_served=$(stripped_size "$embed/target/release/served")
else
    echo "   (build failed: embedder sizes are n/a)"
fi

# ---------------------------------------------------------------------------- load rounds
# Prints "VmRSS_KiB Threads" of a process, reading /proc without forking.
proc_status() {
    local key value rest rss=0 threads=0
    while read -r key value rest; do
        case $key in
        VmRSS:) rss=$value ;;
        Threads:) threads=$value ;;
        esac
    done <"/proc/$1/status"
    echo "$rss $threads"
}

# Until killed, keeps the maximum RSS and thread count of process $1 in file $2.
sample_max() {
    local max_rss=0 max_threads=0 rss threads
    while status=$(proc_status "$1" 2>/dev/null); do
        read -r rss threads <<<"$status"
        ((rss > max_rss)) && max_rss=$rss
        ((threads > max_threads)) && max_threads=$threads
        # Replaced whole, so that a reader never sees a half-written file.
        echo "$max_rss $max_threads" >"$2.new" && mv "$2.new" "$2"
        sleep 0.1
    done
}

# Starts server $1 (khived, baseline or epoll) for mode $2; sets server_pid, socket and dir.
start_server() {
    dir=$(mktemp -d "$work/$1.XXXX") # 0700, as khived requires of its socket directory
    socket=$dir/echo.sock
    case $1 in
    khived) KHIVE_SOCKET=$socket KHIVE_PID=$dir/echo.pid "$echo_bin" 2>"$dir/log" & ;;
    baseline)
        local threads=$BASE_THREADS
        [ "$2" = persistent ] && threads=$BASE_THREADS_PERSISTENT
        "$bench" baseline --socket "$socket" --threads "$threads" 2>"$dir/log" &
        ;;
    epoll) "$bench" baseline --socket "$socket" --epoll 2>"$dir/log" & ;;
    esac
    server_pid=$!
    await_server "$1"
}


load_before=$(busy)
echo "== before the rounds: $load_before"

results=$work/results # server mode round rps p50 p99 p999 max errors idle_rss idle_thr load_rss load_thr
: >"$results"
for mode in one-shot persistent; do
    for round in $(seq "$ROUNDS"); do
        for server in khived baseline epoll; do
            start_server "$server" "$mode"
            # Idle means idle: khived's dispatch watchdog, started by the readiness request
            # (and warm_all), leaves 2 s after the last dispatch.
            sleep 2.5
            read -r idle_rss idle_threads <<<"$(proc_status "$server_pid")"
            echo "0 0" >"$dir/max"
            sample_max "$server_pid" "$dir/max" &
            sampler_pid=$!
            "$bench" load --socket "$socket" --concurrency "$CONCURRENCY" --payload "$PAYLOAD" \
                --duration "$DURATION" --mode "$mode" >"$dir/load"
            kill "$sampler_pid"
            wait "$sampler_pid" 2>/dev/null || true
            sampler_pid=""
            read -r load_rss load_threads <"$dir/max"
            stop_server
            line=$(tail -n 1 "$dir/load")
            row=("$server" "$mode" "$round")
            for field in rps p50_us p99_us p999_us max_us errors; do
                row+=("$(json_field "$field" "$line")")
            done
            row+=("$idle_rss" "$idle_threads" "$load_rss" "$load_threads")
            echo "${row[*]}" >>"$results"
            printf '%-8s %-10s round %s: %9s rps  p99 %8s us  errors %s  idle %s KiB/%s thr  load %s KiB/%s thr\n' \
                "$server" "$mode" "$round" "${row[3]}" "${row[5]}" "${row[8]}" \
                "$idle_rss" "$idle_threads" "$load_rss" "$load_threads"
        done
    done
done

load_after=$(busy)
echo "== after the rounds: $load_after"

# ---------------------------------------------------------------------------- summary
# median SERVER MODE COLUMN (mode "any" takes every round of the server)
median() {
    awk -v s="$1" -v m="$2" -v c="$3" '$1 == s && (m == "any" || $2 == m) {print $c}' "$results" |
        sort -g |
        awk '{v[NR] = $1} END {
            if (NR == 0) print "n/a"
            else if (NR % 2) print v[(NR + 1) / 2]
            else print (v[NR / 2] + v[NR / 2 + 1]) / 2
        }'
}
total() {
    awk -v s="$1" -v m="$2" -v c="$3" '$1 == s && $2 == m {t += $c} END {print t + 0}' "$results"
}
if [ -n "$BENCH_OUT" ]; then : >"$BENCH_OUT"; fi

out "{\"kind\":\"run\",\"date\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\"commit\":\"$commit\",\"nproc\":$(nproc),\"cpu\":\"$cpu\",\"kernel\":\"$(uname -r)\",\"rounds\":$ROUNDS,\"duration_s\":$DURATION,\"concurrency\":$CONCURRENCY,\"payload\":$PAYLOAD,\"baseline_threads\":{\"one-shot\":$BASE_THREADS,\"persistent\":$BASE_THREADS_PERSISTENT},\"before\":\"$load_before\",\"after\":\"$load_after\"}"

echo
echo "== summary: medians of $ROUNDS rounds (${DURATION}s, $CONCURRENCY clients, $PAYLOAD-byte payload);"
echo "   baseline threads: $BASE_THREADS one-shot, $BASE_THREADS_PERSISTENT persistent"
echo "   epoll: the baseline's bare epoll loop, one thread (ratio: khived / baseline, / epoll)"
printf '%-28s %12s %12s %8s %12s %8s\n' metric khived baseline ratio epoll ratio
row() { # label column: khived, baseline and the epoll loop in this mode
    local k b e rb re
    if [ "$2" = errors ]; then
        k=$(total khived "$mode" 9) b=$(total baseline "$mode" 9) e=$(total epoll "$mode" 9)
    else
        k=$(median khived "$mode" "$2") b=$(median baseline "$mode" "$2") e=$(median epoll "$mode" "$2")
    fi
    rb=$(ratio "$k" "$b") re=$(ratio "$k" "$e")
    printf '%-28s %12s %12s %8s %12s %8s\n' "$mode $1" "$k" "$b" "$rb" "$e" "$re"
    out "{\"kind\":\"metric\",\"metric\":\"$mode $1\",\"khived\":$(json_value "$k"),\"baseline\":$(json_value "$b"),\"ratio\":$(json_value "$rb"),\"epoll\":$(json_value "$e"),\"epoll_ratio\":$(json_value "$re")}"
}
for mode in one-shot persistent; do
    row rps 4
    row "p50 us" 5
    row "p99 us" 6
    row "p99.9 us" 7
    row "max us" 8
    row "errors (total)" errors
    row "idle RSS KiB" 10
    row "idle threads" 11
    row "load RSS KiB" 12
    row "load threads" 13
done

echo
printf '%-44s %12s\n' "size (stripped, bytes) / crates" value
fact() { # label value
    printf '%-44s %12s\n' "$1" "$2"
    out "{\"kind\":\"fact\",\"fact\":\"$1\",\"value\":$(json_value "$2")}"
}
fact "examples/echo" "$echo_size"
fact "khived binary" "$khived_size"
fact "crates, khived default features" "$crates_default"
fact "crates, khived no default features" "$crates_minimal"
fact "minimal async-io program" "$embed_plain"
fact "same program serving khived" "$embed_served"
fact "what an embedder pays" "$(awk -v a="$embed_served" -v b="$embed_plain" \
    'BEGIN {if (a == "n/a" || b == "n/a") print "n/a"; else print a - b}')"

echo
echo "== goals"
oneshot_rps=$(median khived one-shot 4)
load_rss=$(median khived one-shot 12)
persistent_rss=$(median khived persistent 12)
if awk -v a="$persistent_rss" -v b="$load_rss" 'BEGIN {exit !(a + 0 > b + 0)}'; then
    load_rss=$persistent_rss
fi
# This round's goals: khived ahead of plain threads in both modes (one-shot against the
# accept pool, persistent against a thread per connection); its p99 against the previous
# commit's is in bench/cores.sh's echo scenario.
goal "one-shot rps, khived / baseline" \
    "$(ratio "$oneshot_rps" "$(median baseline one-shot 4)")" ">=" 1.0
goal "persistent rps, khived / baseline" \
    "$(ratio "$(median khived persistent 4)" "$(median baseline persistent 4)")" ">=" 1.0
goal "one-shot p99, khived / baseline" \
    "$(ratio "$(median khived one-shot 6)" "$(median baseline one-shot 6)")" "<=" 1.2
goal "persistent rps / khived one-shot rps" \
    "$(ratio "$(median khived persistent 4)" "$oneshot_rps")" ">=" 2.5
goal "idle threads (all rounds)" "$(median khived any 11)" "<=" 2
goal "idle RSS KiB (all rounds)" "$(median khived any 10)" "<=" 2560
goal "under-load RSS KiB (worse mode)" "$load_rss" "<=" 4096
goal "stripped examples/echo bytes (KB = 1000)" "$echo_size" "<=" 620000
goal "stripped khived bytes" "$khived_size" "<=" 900000
if [ -n "$BENCH_OUT" ]; then echo "(summary written to $BENCH_OUT)"; fi

# ---------------------------------------------------------------------------- every core
# Compute-bound dispatch against the baseline doing the same work, head-of-line figures, the
# echo rate against an earlier commit, busy and idle threads: bench/cores.sh (CORES=0 skips
# it; its own variables, such as PREV, pass through).
if [ "${CORES:-1}" != 0 ]; then
    echo
    echo "== dispatch on every core: bash bench/cores.sh"
    BENCH_OUT=${BENCH_OUT:+${BENCH_OUT%.jsonl}.cores.jsonl} ROUNDS=$ROUNDS DURATION=$DURATION \
        CONCURRENCY=$CONCURRENCY bash "$root/bench/cores.sh"
fi

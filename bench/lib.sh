# Shared by bench/run.sh, bench/cores.sh, bench/syscalls.sh and bench/instructions.sh, which
# source it after reading their settings: the repository and target directories, a
# temporary directory removed on exit with the servers the script started, the machine's
# description, how busy the machine is, and the summary's helpers. Expects WORK_NAME (the
# temporary directory's prefix) and BENCH_OUT.

case $BENCH_OUT in /* | "") ;; *) BENCH_OUT=$PWD/$BENCH_OUT ;; esac
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}

work=$(mktemp -d "${TMPDIR:-/tmp}/$WORK_NAME.XXXXXX")
server_pid=""
sampler_pid=""
cleanup() {
    for pid in $sampler_pid $server_pid; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Sets cpu and commit, and prints the machine line.
describe_machine() {
    cpu=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
    commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [ -n "$(git -C "$root" status --porcelain 2>/dev/null)" ]; then commit="$commit (dirty)"; fi
    echo "== machine: $(nproc) cores, ${cpu:-unknown CPU}, kernel $(uname -r); $(date -u +%Y-%m-%dT%H:%M:%SZ)"
}

# The examples/echo of revision $PREV, built from a clean export of it (nothing in this
# checkout changes), in a target directory of its own that later runs reuse: sets prev_rev
# and prev_bin, or leaves prev_bin empty when PREV is "none".
build_prev_echo() {
    prev_bin=""
    [ "$PREV" != none ] || return 0
    prev_rev=$(git rev-parse --short "$PREV")
    echo "== building examples/echo of $PREV ($prev_rev)"
    mkdir -p "$work/prev"
    git archive "$prev_rev" | tar -x -C "$work/prev"
    CARGO_TARGET_DIR=$target/prev-echo cargo build -q --release --locked \
        --manifest-path "$work/prev/Cargo.toml" -p khived --example echo
    prev_bin=$target/prev-echo/release/examples/echo
}

# Waits until server $1 answers on $socket (its log in $dir/log); exits if it never does.
await_server() {
    for _ in $(seq 200); do
        [ -S "$socket" ] && break
        sleep 0.05
    done
    if ! "$bench" load --socket "$socket" --requests 1 --concurrency 1 --timeout 10 >/dev/null; then
        echo "$1 did not answer on $socket; its log:" >&2
        cat "$dir/log" >&2
        exit 1
    fi
}

json_field() {
    sed -n "s/.*\"$1\":\([-0-9.e+]*\).*/\1/p" <<<"$2"
}

stop_server() {
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" || true # the baseline dies of the signal; khived drains and exits 0
    server_pid=""
}

# Other work on the machine (a compile, say) shows up in the numbers: say how busy it was.
busy() {
    local comm file compilers=0
    for file in /proc/[0-9]*/comm; do
        { read -r comm <"$file"; } 2>/dev/null || continue
        case $comm in rustc | cargo | cc | ld | ld.lld | collect2) compilers=$((compilers + 1)) ;; esac
    done
    echo "load average $(cut -d' ' -f1-3 /proc/loadavg), $compilers compiler process(es) running"
}

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        if (a == "n/a" || b == "n/a" || b + 0 == 0) print "n/a"; else printf "%.2f\n", a / b
    }'
}
json_value() {
    case $1 in n/a | "") echo null ;; *) echo "$1" ;; esac
}
out() {
    if [ -n "$BENCH_OUT" ]; then echo "$1" >>"$BENCH_OUT"; fi
}
goal() { # label value op target
    local result
    result=$(awk -v v="$2" -v op="$3" -v t="$4" 'BEGIN {
        if (v == "n/a") print "n/a"
        else if (op == "<=") print (v + 0 <= t + 0 ? "PASS" : "MISS")
        else print (v + 0 >= t + 0 ? "PASS" : "MISS")
    }')
    printf '%-44s %10s %s %-8s %s\n' "$1" "$2" "$3" "$4" "$result"
    out "{\"kind\":\"goal\",\"goal\":\"$1\",\"value\":$(json_value "$2"),\"op\":\"$3\",\"target\":$4,\"result\":\"$result\"}"
}

# Builds examples/echo, khived-bench and $PREV's echo, and sets bench and servers (echo,
# prev if there is one, baseline) and the machine's description (bench/syscalls.sh,
# bench/instructions.sh).
build_echo_servers() {
    echo "== building (release)"
    cargo build --release -p khived --example echo
    cargo build --release -p khived-bench
    bench=$target/release/khived-bench
    build_prev_echo
    servers="echo baseline"
    if [ -n "$prev_bin" ]; then servers="echo prev baseline"; fi
    describe_machine
}

# The median of the numbers on stdin (bench/syscalls.sh, bench/instructions.sh).
median_of() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

# Runs `count SERVER $1 $2` (mode, clients) for each of $servers in turn, $ROUNDS times,
# printing each result and keeping it as "SERVER RESULT" lines in $work/results.
run_rounds() {
    local round server result
    : >"$work/results"
    for round in $(seq "$ROUNDS"); do
        for server in $servers; do
            result=$(count "$server" "$1" "$2")
            echo "$server $result" >>"$work/results"
            printf '%-9s round %d: %s\n' "$server" "$round" "$result"
        done
    done
}

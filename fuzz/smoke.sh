#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS seconds each (default 20), one after another.
#
#   bash fuzz/smoke.sh                  # from the repository root or anywhere
#   FUZZ_SECONDS=600 bash fuzz/smoke.sh
#
# Installs cargo-fuzz if it is missing. Works from a fresh clone: the corpus folders are
# created here (they are not committed). A crash's input is printed in base64, since a CI
# clone is thrown away with its artifacts; decode it into fuzz/regressions/<target>/ and
# replay it with `cargo test --test fuzz_regressions`. Ends with `fuzz: N passed, M failed`
# and a non-zero status if any target failed.
set -u

cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-20}"
targets=(frame_reader request_decode connection worker_reply)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    if ! cargo install cargo-fuzz --locked; then
        echo "fuzz: 0 passed, ${#targets[@]} failed"
        exit 1
    fi
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
passed=0
failed=0
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    before="$(ls "fuzz/artifacts/$target")"
    # Inputs of a connection are whole client streams; past 128 KiB they only slow it down
    # (the reader's 64 KiB step is crossed twice already). The 8 MiB seeds are replayed in full
    # by tests/fuzz_regressions.rs.
    extra=()
    if [ "$target" = connection ]; then
        extra=(-max_len=131072)
    fi
    echo "fuzz: $target for ${seconds}s"
    # The regression folder comes last: libFuzzer adds new inputs to the first folder only.
    if cargo fuzz run --sanitizer none "$target" \
        "fuzz/corpus/$target" "fuzz/seeds/$target" "fuzz/regressions/$target" -- \
        -dict="fuzz/$target.dict" -timeout=10 -max_total_time="$seconds" "${extra[@]}" \
        >"$log" 2>&1; then
        passed=$((passed + 1))
        grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1
    else
        failed=$((failed + 1))
        echo "fuzz: $target FAILED:"
        # The panic message or libFuzzer's report (timeout, out of memory), else the whole end.
        if grep -qE 'panicked at|^==[0-9]+== ERROR' "$log"; then
            grep -E -A 4 'panicked at|^==[0-9]+== ERROR' "$log" | head -n 30
        else
            tail -n 40 "$log"
        fi
        for artifact in "fuzz/artifacts/$target"/*; do
            [ -f "$artifact" ] || continue
            if ! grep -qxF "$(basename "$artifact")" <<<"$before"; then
                echo "fuzz: input $(basename "$artifact") in base64:"
                base64 -w 0 "$artifact"
                echo
            fi
        done
    fi
done

echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

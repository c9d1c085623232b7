#!/usr/bin/env bash
# Compares two daemon builds at full speed on a machine whose speed drifts:
# short `loadtest --scenario throughput` runs of A and B alternate (the order
# flips every pair), and what counts is the per-pair ratio B/A of events/s
# and of daemon CPU per event, summed up as geometric means. See
# BENCHMARKS.md, "What changed in session 4", item 5.
#
#   contrib/compare-builds.sh BIN_A BIN_B [PAIRS] [EVENTS] [-- LOADTEST ARGS...]
#
# BIN_A and BIN_B are daemon binaries (or wrapper scripts that exec one);
# run `cargo build --release --workspace` first for target/release/loadtest.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
a=$(realpath "$1") b=$(realpath "$2")
cd "$(dirname "$0")/.."
pairs=${3:-8}
events=${4:-30000}
shift $(( $# < 4 ? $# : 4 ))
[ "${1:-}" = "--" ] && shift
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run() { # BIN FILE [LOADTEST ARGS...]
    local bin=$1 file=$2
    shift 2
    target/release/loadtest --scenario throughput --events "$events" --ceiling-seconds 1 \
        --daemon "$bin" "$@" 2>/dev/null | tail -1 > "$file"
}
for i in $(seq "$pairs"); do
    if [ $((i % 2)) = 1 ]; then
        run "$a" "$out/a$i" "$@"; run "$b" "$out/b$i" "$@"
    else
        run "$b" "$out/b$i" "$@"; run "$a" "$out/a$i" "$@"
    fi
done

python3 - "$out" "$pairs" <<'PY'
import json, math, sys
out, pairs = sys.argv[1], int(sys.argv[2])
rate, cpu = [], []
for i in range(1, pairs + 1):
    a = json.load(open(f"{out}/a{i}"))
    b = json.load(open(f"{out}/b{i}"))
    us = lambda j: 1e6 * j["cpu_s"] / j["events"]
    rate.append(b["acked_per_s"] / a["acked_per_s"])
    cpu.append(us(b) / us(a))
    print(f"pair {i}: A {a['acked_per_s']:7.0f}/s {us(a):4.0f} us/event   "
          f"B {b['acked_per_s']:7.0f}/s {us(b):4.0f} us/event   "
          f"rate B/A {rate[-1]:.3f}  cpu B/A {cpu[-1]:.3f}")
geo = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))
med = lambda xs: sorted(xs)[len(xs) // 2]
print(f"B/A over {pairs} pairs: events/s {geo(rate):.3f} (median {med(rate):.3f}), "
      f"CPU per event {geo(cpu):.3f} (median {med(cpu):.3f})")
PY

#!/usr/bin/env bash
# Profiles the sequential call path of one server, for a fixed number of calls, with tools
# that tolerate a noisy machine (counts rather than times). See "Where the time goes on the
# sequential path" in bench/README.md for what it found.
#
# Usage: bench/profile.sh <server> <transport> <tool> [calls] [warmup]
#   server:    keel-relaxed | keel-full        the JS-hosted runtime (servers/keel.mjs) on the
#                                              release addon ./keel.linux-x64-gnu.node
#              core-relaxed | core-full        core with its Rust test host, no JS
#                                              (crates/core/tests/profile_host.rs, release)
#              baseline-normal | baseline-full servers/baseline.mjs, synchronous=NORMAL or FULL
#   transport: http | ws
#   tool:      ctx      voluntary and involuntary context switches per thread, from /proc
#              strace   syscalls per call (strace -f -c on every thread of the server)
#              perfstat task-clock, context switches and migrations (perf stat, software events)
#              perfrecord  a cpu-clock profile with call graphs (perf record -g); prints the top
#                          symbols and leaves perf.data in the run's directory
#              callgrind   instructions executed per call, by thread (the server runs under
#                          valgrind --tool=callgrind, counting only between the warm-up and the
#                          end of the timed calls; about 50x slower, so use a few hundred
#                          calls); leaves callgrind.out.* in the run's directory for
#                          callgrind_annotate
#   calls:     timed calls (default 2000); warmup: untimed calls before them (default 200)
#
# Each run starts the server on 127.0.0.1 port 0 over a new data directory, warms up with a
# new actor, attaches the tool to every thread of the server, makes the timed calls from
# seq-client.mjs (a separate process), detaches and prints the tool's figures, raw and per
# call. Build first: `npx napi build --platform --release && npx tsc -p tsconfig.json` for
# keel-*, `npm install --prefix bench` for baseline-*; core-* builds its test binary itself.
# KEEL_PROFILE_ADDON (a release addon) and KEEL_BENCH_KEEL_DIR (a tree with dist/) profile
# another build of keel-* than this repo's.
# Wall-clock figures under strace or perf are slowed by the tool; compare counts, not times.
set -euo pipefail

server=${1:?server}
transport=${2:?transport}
tool=${3:?tool}
calls=${4:-2000}
warmup=${5:-200}

bench=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$bench/.." && pwd)
run=$(mktemp -d /tmp/keel-profile.XXXXXX)
mkdir -p "$run/data"
mkfifo "$run/server.in" "$run/client.in"

# Under callgrind the server starts uninstrumented; counting is switched on for the timed calls.
wrap=()
if [[ $tool == callgrind ]]; then
  wrap=(valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes
    --smc-check=all-non-file --callgrind-out-file="$run/callgrind.out.%p")
fi

case $server in
  keel-relaxed | keel-full)
    addon=${KEEL_PROFILE_ADDON:-$repo/keel.linux-x64-gnu.node}
    NAPI_RS_NATIVE_LIBRARY_PATH=$addon KEEL_BENCH_DURABILITY=${server#keel-} \
      "${wrap[@]}" node "$bench/servers/keel.mjs" "$run/data" <"$run/server.in" >"$run/server.out" 2>"$run/server.err" &
    ;;
  baseline-normal | baseline-full)
    sync=${server#baseline-}
    BASELINE_SYNCHRONOUS=${sync^^} "${wrap[@]}" node "$bench/servers/baseline.mjs" "$run/data" \
      <"$run/server.in" >"$run/server.out" 2>"$run/server.err" &
    ;;
  core-relaxed | core-full)
    binary=$(cd "$repo" && cargo test --release -p keel-core --test profile_host --no-run 2>&1 |
      sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
    [[ -x $repo/$binary ]] || { echo "profile.sh: could not build the core test host" >&2; exit 2; }
    KEEL_PROFILE_DIR=$run/data KEEL_PROFILE_DURABILITY=${server#core-} \
      "${wrap[@]}" "$repo/$binary" --ignored --exact serve_for_profiling --nocapture \
      <"$run/server.in" >"$run/server.out" 2>"$run/server.err" &
    ;;
  *) echo "profile.sh: unknown server $server" >&2; exit 2 ;;
esac
pid=$!
exec 7>"$run/server.in" # held open: the server stops when it closes
cleanup() {
  exec 7>&- 8>&- 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
trap cleanup EXIT

# The server prints its ready line once listening.
while ! port=$(grep -o '"port":[0-9]*' "$run/server.out" 2>/dev/null | head -1 | cut -d: -f2) || [[ -z $port ]]; do
  kill -0 "$pid" 2>/dev/null || { cat "$run/server.err" >&2; exit 1; }
  sleep 0.05
done

node "$bench/seq-client.mjs" "$port" "$transport" "$warmup" "$calls" <"$run/client.in" >"$run/client.out" 2>"$run/client.err" &
client=$!
exec 8>"$run/client.in"
until grep -q '^warm$' "$run/client.out" 2>/dev/null; do
  kill -0 "$client" 2>/dev/null || { cat "$run/client.err" >&2; exit 1; }
  sleep 0.05
done

# Context switches of every thread, as name:tid.
ctx() {
  for task in /proc/"$pid"/task/*; do
    name=$(tr ' ' _ <"$task/comm"):${task##*/}
    awk -v n="$name" '/^voluntary_ctxt_switches/ {v=$2} /^nonvoluntary_ctxt_switches/ {i=$2} END {print n, v, i}' "$task/status"
  done | awk '{v[$1]+=$2; i[$1]+=$3} END {for (n in v) print n, v[n], i[n]}' | sort
}

tool_pid=
case $tool in
  ctx) ctx >"$run/ctx.before" ;;
  callgrind) callgrind_control -i on "$pid" >/dev/null ;;
  strace)
    strace -f -c -S calls -o "$run/strace.out" -p "$pid" 2>"$run/strace.err" &
    tool_pid=$!
    # Attached once it says so ("Process N attached with M threads").
    until grep -q attached "$run/strace.err" 2>/dev/null; do
      sleep 0.05
    done
    ;;
  perfstat | perfrecord)
    mkfifo "$run/perf.ctl" "$run/perf.ack"
    if [[ $tool == perfstat ]]; then
      perf stat -e task-clock,context-switches,cpu-migrations,page-faults --per-thread -D -1 \
        --control "fifo:$run/perf.ctl,$run/perf.ack" -p "$pid" -o "$run/perf.out" &
    else
      perf record -e cpu-clock -F 4000 -g -D -1 --control "fifo:$run/perf.ctl,$run/perf.ack" \
        -p "$pid" -o "$run/perf.data" 2>"$run/perf.err" &
    fi
    tool_pid=$!
    exec 9>"$run/perf.ctl"
    echo enable >&9
    read -r _ <"$run/perf.ack"
    ;;
  *) echo "profile.sh: unknown tool $tool" >&2; exit 2 ;;
esac

echo go >&8
wait "$client" || { cat "$run/client.err" >&2; exit 1; }
result=$(tail -1 "$run/client.out")

case $tool in
  ctx) ctx >"$run/ctx.after" ;;
  callgrind)
    callgrind_control -i off "$pid" >/dev/null
    exec 7>&- # the server exits, and callgrind writes one file per thread
    wait "$pid" || true
    ;;
  strace) kill -INT "$tool_pid"; wait "$tool_pid" || true ;;
  perfstat | perfrecord)
    echo disable >&9
    read -r _ <"$run/perf.ack"
    exec 9>&-
    kill -INT "$tool_pid"
    wait "$tool_pid" || true
    ;;
esac

echo "# $server $transport $tool: $calls calls after $warmup warm-up; run dir $run"
echo "client: $result"
case $tool in
  ctx)
    echo "thread  voluntary/call  involuntary/call"
    join "$run/ctx.before" "$run/ctx.after" |
      awk -v c="$calls" '$4 > $2 + c / 100 {printf "%-24s %8.2f %8.2f\n", $1, ($4-$2)/c, ($5-$3)/c}'
    ;;
  strace)
    # Print the table itself with a per-call column (calls is the 4th field).
    awk -v c="$calls" 'NR <= 2 { print; next } /^-/ { print; next }
      { printf "%s   %7.2f/call\n", $0, $4 / c }' "$run/strace.out"
    ;;
  perfstat) cat "$run/perf.out" ;;
  callgrind)
    echo "thread  instructions/call"
    for file in "$run"/callgrind.out.*-*; do
      ir=$(sed -n 's/^totals: \([0-9]*\).*/\1/p' "$file")
      echo "thread-${file##*-} ${ir:-0}"
    done | awk -v c="$calls" '{ total += $2; if ($2 > c * 100) printf "%-12s %12.0f\n", $1, $2 / c }
      END { printf "%-12s %12.0f\n", "all", total / c }'
    ;;
  perfrecord)
    perf report -i "$run/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
      grep -v '^$' | grep -E '^ +[0-9]' | head -40
    ;;
esac

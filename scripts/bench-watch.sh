#!/usr/bin/env bash
# bench-watch.sh -- delivery-to-visible latency and CPU of `mdsync watch`, against an
# lsyncd-style `inotifywait -m -r` + `rsync -a --delete` loop, in the same run; and of
# `mdsync watch --two-way` (deliveries into A, latency to B, B local and watched too).
#
# Usage: scripts/bench-watch.sh [--rate N] [--duration S] [--messages N] [--idle S]
#                               [--tools LIST] [--out FILE] [--keep]
#   --rate N      deliveries per second into SRC's INBOX (default 50)
#   --duration S  seconds of delivery per tool (default 60)
#   --messages N  size of the generated source tree before deliveries (default 20000)
#   --idle S      seconds of idle CPU measurement after the deliveries (default 10)
#   --tools LIST  comma-separated subset of mdsync,lsyncd,mdsync-two-way (default: all three)
#   --out FILE    markdown report, also printed on stdout (default benches/runs/<date>-watch.md)
#   --keep        keep the scratch directory (its path is printed)
#   BENCH_DIR     parent of the scratch directory (default: the system temp dir)
#
# What it does, per tool, one tool after the other on the same source tree:
#   1. the initial copy (`mdsync watch` does it itself; the loop gets one `rsync -a --delete`);
#   2. the watcher is started in its own process group;
#   3. a Python script delivers N messages per second the way an MDA does (write the
#      message into INBOX's tmp/, then rename it into new/; Dovecot numbers it later) and
#      watches the destination's INBOX new/ and cur/ with inotify; a message's latency is
#      from its rename into SRC's new/ to its name appearing in DST's new/ or cur/ (one
#      monotonic clock, one process);
#   4. CPU (user+sys of every process in the watcher's process group, exited children
#      included) over the delivery window and over --idle seconds of quiet afterwards, as a
#      percentage of one core.
# The "lsyncd" contender is `inotifywait -m -r -e close_write,moved_to,moved_from,create,delete
# SRC | while read; do (gather events until 50 ms of quiet, at most 200 ms); rsync -a --delete
# SRC/ DST/; done`: the shape of an lsyncd rsync setup with mdsync's batching window
# (lsyncd's own default waits 15 s). "mdsync-two-way" runs last (it may write into SRC:
# the uidlist of what it merged), into an empty DST that it watches too.
#
# It installs inotify-tools and rsync when missing (apt), never writes outside its scratch
# directory, the --out file and cargo's target directory, and stops only the processes it
# started (by process group). Run it as root (the tree is owned by vmail, like Dovecot's).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
bench_name=bench-watch
# shellcheck source=scripts/bench-common.sh
source "$repo/scripts/bench-common.sh"
rate=50 duration=60 messages=20000 idle=10 tools="mdsync,lsyncd,mdsync-two-way" out="" keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --rate) rate=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --messages) messages=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    --tools) tools=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-watch: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
out=${out:-$repo/benches/runs/$(date +%Y-%m-%d-%H%M%S)-watch.md}
for t in ${tools//,/ }; do
  case $t in mdsync|lsyncd|mdsync-two-way) ;; *) log "unknown tool $t"; exit 2 ;; esac
done

bench_prerequisites
for tool in inotifywait:inotify-tools rsync:rsync; do
  if ! command -v "${tool%%:*}" >/dev/null; then
    log "installing ${tool#*:}"
    apt-get install -y --no-install-recommends "${tool#*:}" >/dev/null ||
      { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${tool#*:}" >/dev/null; }
  fi
done

make_scratch mdsync-bench-watch
started_pgids=()
cleanup() {
  local g
  for g in "${started_pgids[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  if [ "$keep" = 1 ]; then log "scratch directory: $W (kept)"; else rm -rf "$W"; fi
}
trap cleanup EXIT

if has mdsync || has mdsync-two-way; then
  build_mdsync "$W/build.log"
  [ -n "$mdsync" ] || exit 1
fi
log "generating a $messages-message source tree"
python3 "$repo/scripts/gen-corpus.py" --messages "$messages" --out "$W/src" --seed 1 >/dev/null
hz=$(getconf CLK_TCK)

# cpu_ticks PGID: user+sys ticks of every live process in the group, with the ticks of
# the children they waited for.
cpu_ticks() {
  local total=0 f rest
  for f in /proc/[0-9]*/stat; do
    rest=$(cat "$f" 2>/dev/null) || continue
    rest=${rest##*) }
    # shellcheck disable=SC2086
    set -- $rest
    # After the name: $1 state, $3 pgrp, $12-$15 utime stime cutime cstime.
    if [ "$3" != "$PGID" ]; then continue; fi
    total=$((total + ${12} + ${13} + ${14} + ${15}))
  done
  echo "$total"
}

# The delivering and observing script (Python standard library only; inotify by ctypes).
cat >"$W/deliver.py" <<'PY'
import ctypes, json, os, struct, sys, threading, time
src, dst, rate, duration, tag = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
libc = ctypes.CDLL("libc.so.6", use_errno=True)
IN_CREATE, IN_MOVED_TO = 0x100, 0x80
fd = libc.inotify_init1(0)
for sub in ("new", "cur"):
    if libc.inotify_add_watch(fd, os.path.join(dst, sub).encode(), IN_CREATE | IN_MOVED_TO) < 0:
        sys.exit(f"cannot watch {dst}/{sub}: errno {ctypes.get_errno()}")
delivered, seen, lock = {}, {}, threading.Lock()

def observe():
    while True:
        buf = os.read(fd, 1 << 16)
        now = time.monotonic()
        off = 0
        while off < len(buf):
            _wd, _mask, _cookie, n = struct.unpack_from("iIII", buf, off)
            name = buf[off + 16: off + 16 + n].rstrip(b"\0").decode(errors="replace")
            off += 16 + n
            if name.startswith("."):
                continue  # rsync's temp files
            with lock:
                seen.setdefault(name.split(":")[0], now)

threading.Thread(target=observe, daemon=True).start()
body = ("From: bench@example.org\nTo: alice@example.org\nSubject: watch bench\n\n"
        + "lorem ipsum dolor sit amet consectetur\n" * 100).encode()
count = int(rate * duration)
t0 = time.monotonic()
for i in range(count):
    delay = t0 + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    base = f"{int(time.time())}.M{i}P{os.getpid()}.{tag}-bench,S={len(body)}"
    tmp = os.path.join(src, "tmp", base)
    with open(tmp, "wb") as f:
        f.write(body)
    os.rename(tmp, os.path.join(src, "new", base))
    with lock:
        delivered[base] = time.monotonic()
end = time.monotonic()
deadline = end + 30
while time.monotonic() < deadline:
    with lock:
        if all(b in seen for b in delivered):
            break
    time.sleep(0.05)
with lock:
    lat = sorted((seen[b] - t) * 1000 for b, t in delivered.items() if b in seen)
missing = len(delivered) - len(lat)
pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None
print(json.dumps({"delivered": len(delivered), "seen": len(lat), "missing": missing,
                  "p50": pick(0.50), "p99": pick(0.99), "max": round(lat[-1], 1) if lat else None,
                  "window": round(end - t0, 2)}))
PY

# measure TOOL PGID: deliveries, then the CPU of the group while delivering and idle.
measure() {
  local tool=$1 result before after idle_before idle_after window
  PGID=$2
  before=$(cpu_ticks)
  result=$(python3 "$W/deliver.py" "$W/src" "$W/dst-$tool" "$rate" "$duration" "$tool")
  after=$(cpu_ticks)
  window=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['window'])" "$result")
  sleep 2
  idle_before=$(cpu_ticks)
  sleep "$idle"
  idle_after=$(cpu_ticks)
  python3 - "$tool" "$result" "$((after - before))" "$window" "$((idle_after - idle_before))" \
    "$idle" "$hz" >>"$W/results.jsonl" <<'PY'
import json, sys
tool, result, busy, window, quiet, idle, hz = sys.argv[1:]
r = json.loads(result)
r["tool"] = tool
r["cpu_busy_pct"] = round(100 * int(busy) / int(hz) / float(window), 1)
r["cpu_idle_pct"] = round(100 * int(quiet) / int(hz) / float(idle), 2)
print(json.dumps(r))
PY
  log "$tool: $(tail -1 "$W/results.jsonl")"
}

# wait_for FILE PATTERN SECONDS
wait_for() {
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    if grep -q "$2" "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "timed out waiting for $2 in $1"; return 1
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
if has mdsync; then
  log "mdsync watch: initial copy, then $duration s at $rate messages/s"
  setsid "$mdsync" watch --json --no-cache "$W/src" "$W/dst-mdsync" \
    >"$W/mdsync.jsonl" 2>"$W/mdsync.log" &
  pid=$!; started_pgids+=("$pid")
  wait_for "$W/mdsync.jsonl" '"full":true' 600
  measure mdsync "$pid"
  kill -TERM "$pid"; wait "$pid" || log "mdsync watch exited with $?"
fi
if has lsyncd; then
  log "inotifywait + rsync loop: initial rsync, then $duration s at $rate messages/s"
  rsync -a --delete "$W/src/" "$W/dst-lsyncd/"
  cat >"$W/lsyncd-like.sh" <<'SH'
src=$1 dst=$2
inotifywait -m -r -q -e close_write,moved_to,moved_from,create,delete --format x "$src" |
while read -r _; do
  # Gather events until 50 ms of quiet, at most 200 ms: the same window as mdsync's
  # default --debounce and --max-delay.
  start=${EPOCHREALTIME/./}
  while (( ${EPOCHREALTIME/./} - start < 200000 )) && read -r -t 0.05 _; do :; done
  rsync -a --delete "$src/" "$dst/"
done
SH
  setsid bash "$W/lsyncd-like.sh" "$W/src" "$W/dst-lsyncd" 2>"$W/lsyncd.log" &
  pid=$!; started_pgids+=("$pid")
  sleep 2 # inotifywait sets up its recursive watches
  measure lsyncd "$pid"
  kill -TERM -- "-$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
fi
if has mdsync-two-way; then
  log "mdsync watch --two-way: first sync, then $duration s at $rate messages/s"
  mkdir -p "$W/dst-mdsync-two-way"
  setsid "$mdsync" watch --two-way --json --no-cache "$W/src" "$W/dst-mdsync-two-way" \
    >"$W/mdsync-two-way.jsonl" 2>"$W/mdsync-two-way.log" &
  pid=$!; started_pgids+=("$pid")
  wait_for "$W/mdsync-two-way.jsonl" '"full":true' 600
  measure mdsync-two-way "$pid"
  kill -TERM "$pid"; wait "$pid" || log "mdsync watch --two-way exited with $?"
fi
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p "$(dirname "$out")"
python3 - "$W/results.jsonl" "$rate" "$duration" "$messages" "$load_before" "$load_after" \
  "$(nproc)" >"$out" <<'PY'
import json, sys
path, rate, duration, messages, lb, la, cores = sys.argv[1:]
names = {"mdsync": "mdsync watch", "lsyncd": "inotifywait + rsync loop",
         "mdsync-two-way": "mdsync watch --two-way"}
print(f"Delivering {rate} messages/s for {duration} s into a {messages}-message tree "
      f"(MDA-style: tmp/ then rename into new/); {cores} cores; load average "
      f"{lb} before, {la} after.\n")
print("| watcher | delivered | seen on DST | p50 latency | p99 latency | max latency "
      "| CPU while delivering | CPU idle |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
fmt = lambda v: "–" if v is None else f"{v:.0f} ms"
for line in open(path):
    r = json.loads(line)
    print(f"| {names[r['tool']]} | {r['delivered']} | {r['seen']} | {fmt(r['p50'])} | "
          f"{fmt(r['p99'])} | {fmt(r['max'])} | {r['cpu_busy_pct']:.1f}% of a core | "
          f"{r['cpu_idle_pct']:.2f}% |")
PY
cat "$out"

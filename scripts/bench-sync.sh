#!/usr/bin/env bash
# bench-sync.sh -- two-way `mdsync sync A B` against `doveadm sync` and `unison -batch`,
# locally and over ssh to 127.0.0.1, in one run.
#
# Usage: scripts/bench-sync.sh [--messages N] [--runs R] [--out FILE] [--seed S] [--keep]
#   --messages N  corpus size (default 100000, about 2.7 GB)
#   --runs R      runs per scenario and tool; the table shows the median (default 3)
#   --out FILE    markdown report, also printed on stdout (default benches/runs/<date>-sync.md)
#   --seed S      corpus seed (default 1)
#   --keep        keep the scratch directory (its path is printed)
#   BENCH_DIR     parent of the scratch directory (default: the system temp dir)
#
# Every tool gets its own pair of trees A and B, made from one corpus (scripts/gen-corpus.py):
# message files hard-linked (no tool writes a message file in place), control files copied.
# Each pair is synced once (untimed: mdsync records its base, doveadm its state, unison its
# archive), then, per location (local, then over a throwaway sshd on 127.0.0.1):
#   1. no change: sync again;
#   2. mutation: scripts/mutate-corpus.py --flags 1 --new 0.5 on A and, with another seed,
#      on B — both sides number their new mail from the same next UID, so mailboxes that got
#      new mail on both sides have UID conflicts — then sync.
# Also measured: a no-change `mdsync backup A B` (the two-way target is within 2x of it).
# After every run each side must hold every message once: a tool that exits non-zero or
# leaves another number of message files is reported as `failed`; unison, which cannot merge
# two changed dovecot-uidlist files and leaves them alone (exit 1), as `conflicts`.
# Installs unison (apt-get) when it is missing. Writes only in its scratch directory, the
# --out file and cargo's target directory; stops only the sshd it started. Run it as root.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/dovecot-conf.sh
source "$repo/scripts/dovecot-conf.sh"
# shellcheck source=scripts/bench-common.sh
source "$repo/scripts/bench-common.sh"
bench_name=bench-sync
messages=100000 runs=3 out="" seed=1 keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --messages) messages=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-sync: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
out=${out:-$repo/benches/runs/$(date +%Y-%m-%d-%H%M%S)-sync.md}
tools=mdsync,doveadm,unison

bench_prerequisites
if ! command -v unison >/dev/null; then
  log "installing unison"
  apt-get install -y --no-install-recommends unison >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends unison >/dev/null; }
fi
make_scratch mdsync-bench-sync
[[ $W =~ ^[A-Za-z0-9_./+-]+$ ]] || { log "scratch path $W needs a plain BENCH_DIR"; exit 2; }
sshd_pid="" sshd_start=""
# shellcheck source=scripts/bench-sshd.sh
source "$repo/scripts/bench-sshd.sh"
cleanup() {
  stop_sshd
  if [ "$keep" = 1 ]; then log "scratch directory: $W (kept)"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
require_space $((messages * 31 * 1024 * 2))
mkdir -p "$W/logs" "$W/bin" "$W/cache" "$W/unison"
install -d -o vmail -g vmail -m 700 "$W/home"
unset SSH_AUTH_SOCK
export UNISON=$W/unison

build_mdsync "$W/logs/cargo-build.log"
[ -n "$mdsync" ] || exit 1
cp "$mdsync" "$W/bin/mdsync"; mdsync=$W/bin/mdsync
cat >"$W/bin/mdsync-remote" <<WRAP
#!/bin/sh
XDG_CACHE_HOME=$W/cache/remote HOME=$W/cache/remote
export XDG_CACHE_HOME HOME
exec $mdsync "\$@"
WRAP
chmod 755 "$W/bin/mdsync-remote"
write_dovecot_conf "$W"
DA=(env USER=vmail HOME="$W/home" doveadm -c "$W/dovecot.conf")

log "generating $messages messages"
python3 "$repo/scripts/gen-corpus.py" --messages "$messages" --out "$W/corpus" --seed "$seed" \
  --owner vmail >"$W/logs/gen-corpus.log"

# pair TOOL: fresh trees $W/TOOL-a and $W/TOOL-b from the corpus.
pair() {
  local side
  for side in a b; do
    rm -rf "$W/$1-$side"
    cp -al "$W/corpus" "$W/$1-$side"
    # Control files are rewritten (or appended to, by Dovecot) in place: private copies.
    find "$W/$1-$side" -type f \( -name 'dovecot-*' -o -name subscriptions \) \
      -exec sh -c 'for f; do cp -p "$f" "$f.copy" && mv "$f.copy" "$f"; done' sh {} +
  done
}

# Sets CMD to tool $1 syncing its pair; $2 is "local" or "ssh".
tool_cmd() {
  local a=$W/${1%-backup}-a b=$W/${1%-backup}-b
  case $1-$2 in
    mdsync-local) CMD=("$mdsync" sync --no-progress --cache-dir "$W/cache/local" "$a" "$b") ;;
    mdsync-ssh) CMD=("$mdsync" sync --no-progress --cache-dir "$W/cache/local" -e "$RSH"
                     --remote-mdsync "$W/bin/mdsync-remote" "$a" "127.0.0.1:$b") ;;
    mdsync-backup-local) CMD=("$mdsync" backup --no-progress --cache-dir "$W/cache/local" "$a" "$b") ;;
    mdsync-backup-ssh) CMD=("$mdsync" backup --no-progress --cache-dir "$W/cache/local" -e "$RSH"
                            --remote-mdsync "$W/bin/mdsync-remote" "$a" "127.0.0.1:$b") ;;
    doveadm-local) CMD=("${DA[@]}" -o "mail_location=maildir:$a" sync "maildir:$b") ;;
    doveadm-ssh) CMD=("${DA[@]}" -o "mail_location=maildir:$a" sync "${SSH[@]}" 127.0.0.1
                      env USER=vmail HOME="$W/home" doveadm -c "$W/dovecot.conf"
                      -o "mail_location=maildir:$b" dsync-server) ;;
    unison-local) CMD=(unison -batch -silent -times -owner -group -confirmbigdel=false "$a" "$b") ;;
    unison-ssh) CMD=(unison -batch -silent -times -owner -group -confirmbigdel=false
                     -sshargs "${SSH[*]:1}" "$a" "ssh://127.0.0.1/$b") ;;
  esac
}

# Message files of a tree.
msg_count() { find "$1" \( -path '*/cur/*' -o -path '*/new/*' \) -type f | wc -l; }

# measure WHERE SCENARIO TOOL RUN: one timed run, a line in results.tsv. Afterwards both
# sides must hold $want message files (nothing lost, nothing copied twice).
measure() {
  local where=$1 scen=$2 tool=$3 run=$4 rc=0 status=ok p=${3%-backup}
  tool_cmd "$tool" "$where"
  sync
  t0=$(date +%s%N)
  /usr/bin/time -f '%e %U %S %M' -o "$W/time.out" "${CMD[@]}" \
    >"$W/logs/$where-$scen-$tool-$run.log" 2>&1 || rc=$?
  t1=$(date +%s%N)
  wall=0 user=0 sys=0 rss=0
  read -r wall user sys rss < <(tail -1 "$W/time.out") || true
  # GNU time counts wall time in centiseconds; a no-change run needs milliseconds.
  wall=$(awk -v ns=$((t1 - t0)) 'BEGIN { printf "%.3f", ns / 1e9 }')
  if [ "$rc" -ne 0 ]; then
    status=failed; log "$where $scen $tool run $run: exit status $rc:"
    tail -5 "$W/logs/$where-$scen-$tool-$run.log" >&2
  elif [ "$(msg_count "$W/$p-a")" != "$want" ] || [ "$(msg_count "$W/$p-b")" != "$want" ]; then
    status=failed
    log "$where $scen $tool run $run: $(msg_count "$W/$p-a") and $(msg_count "$W/$p-b") messages, want $want"
  fi
  if [ "$rc" -ne 0 ] && [ "$p" = unison ] && grep -q -e '<-?->' "$W/logs/$where-$scen-$tool-$run.log"; then
    status=conflicts   # unison cannot merge two changed uidlists: it leaves both alone
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$where" "$scen" "$tool" "$run" "$status" "$wall" \
    "$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')" "$rss" >>"$W/results.tsv"
  log "$where $scen $tool run $run: $status, wall ${wall}s"
}

for where in local ssh; do
  if [ "$where" = ssh ]; then log "starting sshd on 127.0.0.1"; start_sshd; fi
  for t in mdsync doveadm unison; do
    pair "$t"
    rm -rf "$W/unison"/* "$W/cache/local" "$W/cache/remote"
    tool_cmd "$t" "$where"
    log "$where: first $t sync (untimed)"
    "${CMD[@]}" >"$W/logs/$where-first-$t.log" 2>&1 || log "first $t sync failed (exit $?)"
  done
  # mdsync backup records its own pair state on its first run.
  tool_cmd mdsync-backup "$where"; "${CMD[@]}" >/dev/null 2>&1 || true
  for ((run = 1; run <= runs; run++)); do
    for t in $(rotate "$run" mdsync doveadm unison mdsync-backup); do
      want=$(msg_count "$W/${t%-backup}-a")
      measure "$where" nochange "$t" "$run"
    done
  done
  for ((run = 1; run <= runs; run++)); do
    for t in $(rotate "$run" mdsync doveadm unison); do
      before=$(msg_count "$W/$t-a")
      python3 "$repo/scripts/mutate-corpus.py" "$W/$t-a" --flags 1 --new 0.5 --expunge 0 \
        --seed $((1000 + run)) >>"$W/mutations-$where-$t.txt"
      python3 "$repo/scripts/mutate-corpus.py" "$W/$t-b" --flags 1 --new 0.5 --expunge 0 \
        --seed $((2000 + run)) >>"$W/mutations-$where-$t.txt"
      want=$(($(msg_count "$W/$t-a") + $(msg_count "$W/$t-b") - before))
      measure "$where" mutated "$t" "$run"
    done
  done
  if [ "$where" = ssh ]; then stop_sshd; fi
done

mkdir -p "$(dirname "$out")"
RUNS=$runs MESSAGES=$messages python3 - "$W/results.tsv" "$W/mutations-local-mdsync.txt" \
  <<'EOF' | tee "$out"
import os, statistics, sys, time
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
env = os.environ
NAME = {"mdsync": "mdsync sync", "doveadm": "doveadm sync", "unison": "unison -batch",
        "mdsync-backup": "mdsync backup (one-way)"}
SCEN = {"nochange": "no change", "mutated": "1% flags + 0.5% new on each side"}

def med(where, scen, tool):
    """(median wall time, note) of a cell, or None."""
    rs = [r for r in rows if r[:3] == [where, scen, tool]]
    if not rs:
        return None
    wall = statistics.median(float(r[5]) for r in rs)
    bad = sum(r[4] == "failed" for r in rs)
    note = ""
    if bad:
        note = " (%d of %d runs failed the check)" % (bad, len(rs))
    elif any(r[4] == "conflicts" for r in rs):
        note = " (uidlist conflicts left)"
    return wall, note

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), "?")
print("# mdsync two-way sync benchmark, %s\n" % time.strftime("%Y-%m-%d %H:%M %Z"))
print("- corpus: %s messages (scripts/gen-corpus.py), each tool on its own pair of trees" %
      env["MESSAGES"])
print("- machine: %s, %d cores; warm cache; median of %s run(s); tools alternate" % (
    cpu, os.cpu_count(), env["RUNS"]))
print("- ratio = wall time / mdsync sync's wall time in the same row group")
print("- a run fails the check when the tool exits non-zero or a side does not hold every")
print("  message exactly once afterwards (its time is still shown)")
print("- unison cannot merge two changed `dovecot-uidlist` files: it leaves them (exit 1)\n")
print("| where | scenario | tool | wall s | ratio vs mdsync sync |")
print("|---|---|---|---|---|")
for where in ["local", "ssh"]:
    for scen in ["nochange", "mutated"]:
        base = med(where, scen, "mdsync")
        for tool in ["mdsync", "mdsync-backup", "doveadm", "unison"]:
            m = med(where, scen, tool)
            if m is None:
                continue
            ratio = "%.2f" % (m[0] / base[0]) if base and base[0] else "n/a"
            print("| %s | %s | %s | %.3f%s | %s |" % (where, SCEN[scen], NAME[tool], m[0], m[1],
                                                     ratio))
print("\nMutations of the first local mdsync pair (one line per side and run):\n")
for line in open(sys.argv[2]).read().splitlines():
    print("    " + line)
print("\n<details><summary>all runs</summary>\n")
print("| where | scenario | tool | run | status | wall s | cpu s | peak RSS KiB |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print("\n</details>")
EOF
log "report written to $out"

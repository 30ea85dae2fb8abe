#!/usr/bin/env bash
# bench.sh -- end-to-end benchmark of `mdsync backup` against rsync, doveadm backup and cp.
#
# Usage: scripts/bench.sh [--messages N] [--runs R] [--out FILE] [--tools LIST] [--seed S] [--keep]
#   --messages N  corpus size (default 100000, about 2.7 GB)
#   --runs R      runs per scenario and tool; the table shows the median (default 3)
#   --out FILE    markdown report, also printed on stdout (default benches/runs/<date>.md)
#   --tools LIST  comma-separated subset of mdsync,rsync,doveadm,cp (default: all four)
#   --seed S      corpus seed (default 1)
#   --keep        keep the scratch directory (its path is printed)
#   BENCH_DIR     parent of the scratch directory (default: the system temp dir); needs free
#                 disk of about 4x the corpus
#
# It builds `cargo build --release` (when mdsync is benchmarked), generates a corpus with
# scripts/gen-corpus.py and measures, in one run, wall time, CPU time (user+sys) and peak RSS
# with GNU /usr/bin/time, plus bytes written to storage (write_bytes of /proc/<pid>/io, summed
# over the tool's processes), for:
#   1. initial copy into an empty destination: mdsync, rsync -a --delete, doveadm backup, cp -a;
#   2. re-run with no change: mdsync, mdsync --no-cache, rsync, doveadm backup;
#   3. re-run after scripts/mutate-corpus.py --flags 1 --new 0.5 --expunge 0.2 on the source:
#      mdsync, rsync, doveadm backup.
# Tools alternate run by run (the disk is shared and noisy) and every run starts after `sync`.
# Caches cannot be dropped here: all runs are warm-cache. After every run the destination's
# set of message base names is compared with the source's (flags are not compared); a tool
# that exits non-zero or leaves a different set is reported as `failed`.
#
# It never touches anything outside its scratch directory, the --out file and cargo's target
# directory, never drops caches and never stops other processes. Run it as root: doveadm
# needs the `vmail` user (it drops to it itself) and the trees are owned by vmail.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/dovecot-conf.sh
source "$repo/scripts/dovecot-conf.sh"
# shellcheck source=scripts/bench-common.sh
source "$repo/scripts/bench-common.sh"
messages=100000 runs=3 out="" tools="mdsync,rsync,doveadm,cp" seed=1 keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --messages) messages=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tools) tools=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
out=${out:-$repo/benches/runs/$(date +%Y-%m-%d-%H%M%S).md}
for t in ${tools//,/ }; do
  case $t in mdsync|rsync|doveadm|cp) ;; *) log "unknown tool $t"; exit 2 ;; esac
done

bench_prerequisites

# Scratch directory; about 4x the corpus: source + 3 destinations (cp's copy is removed
# right after it is measured).
make_scratch mdsync-bench
if [ "$keep" = 1 ]; then log "scratch directory: $W (kept)"; else trap 'rm -rf "$W"' EXIT; fi
trap 'exit 130' INT TERM
# ~28 KiB per message plus file system overhead: the source and 4 destinations per run.
require_space $((messages * 31 * 1024 * (1 + 4 * runs)))

SRC=$W/src
mkdir -p "$W/logs" "$W/run"
install -d -o vmail -g vmail -m 700 "$W/home" "$W/src-index"

mdsync=""
if has mdsync; then build_mdsync "$W/logs/cargo-build.log"; fi

# Standalone doveadm (dovecot-standalone.md). The source's index files go to $W/src-index
# so that the source tree stays exactly what the generator and mutate-corpus.py made; the
# destination keeps its indexes inside, as a doveadm backup target would.
write_dovecot_conf "$W"
DA_SRC=(env USER=vmail HOME="$W/home" doveadm -c "$W/dovecot.conf"
        -o "mail_location=maildir:$SRC:INDEX=$W/src-index")
# Bring the source's index up to date (untimed), as a live server's index would be.
warm_src_index() {
  if has doveadm; then "${DA_SRC[@]}" mailbox status messages '*' >/dev/null; fi
}

# Sets CMD to the command of tool $1 copying $SRC to $2.
tool_cmd() {
  case $1 in
    mdsync) CMD=("${mdsync:-false}" backup --no-progress "$SRC" "$2") ;;
    mdsync-nocache) CMD=("${mdsync:-false}" backup --no-progress --no-cache "$SRC" "$2") ;;
    rsync) CMD=(rsync -a --delete "$SRC/" "$2/") ;;
    doveadm) CMD=("${DA_SRC[@]}" -o maildir_copy_with_hardlinks=no backup "maildir:$2") ;;
    cp) CMD=(cp -a "$SRC" "$2") ;;
  esac
}

# write_bytes of this shell: it grows by the I/O of every child this shell has reaped.
read_write_bytes() {
  local key val
  while read -r key val; do
    if [ "$key" = write_bytes: ]; then WRITE_BYTES=$val; fi
  done </proc/$$/io
}

# measure SCENARIO TOOL RUN: run the tool once on its destination, append a line to results.
# Must run in this shell (not in a pipe or $(...)) so that /proc/$$/io sees the tool's I/O.
measure() {
  local scen=$1 tool=$2 run=$3 dst=$W/dst-${2%-nocache} rc=0 status=ok w0
  tool_cmd "$tool" "$dst"
  sync
  read_write_bytes; w0=$WRITE_BYTES
  /usr/bin/time -f '%e %U %S %M' -o "$W/time.out" "${CMD[@]}" \
    >"$W/logs/$scen-$tool-$run.log" 2>&1 || rc=$?
  read_write_bytes
  wall=0 user=0 sys=0 rss=0
  read -r wall user sys rss < <(tail -1 "$W/time.out") || true
  if [ "$rc" -ne 0 ]; then
    status=failed; log "$scen $tool run $run: exit status $rc; last lines of its output:"
    tail -5 "$W/logs/$scen-$tool-$run.log" >&2
  elif [ "$(msg_names "$dst")" != "$src_names" ]; then
    status=failed; log "$scen $tool run $run: destination messages differ from the source"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$tool" "$run" "$status" "$wall" \
    "$user" "$sys" "$rss" "$((WRITE_BYTES - w0))" >>"$W/results.tsv"
  log "$scen $tool run $run: $status, wall ${wall}s"
}

sync_tools=()
for t in mdsync rsync doveadm; do has "$t" && sync_tools+=("$t"); done
fresh_dst() { retire "$W/dst-$1"; [ "$1" = cp ] || install -d -o vmail -g vmail -m 700 "$W/dst-$1"; }

log "generating $messages messages in $SRC"
gen_start=$(date +%s%N)
python3 "$repo/scripts/gen-corpus.py" --messages "$messages" --out "$SRC" --seed "$seed" \
  --owner vmail >"$W/logs/gen-corpus.log"
gen_ms=$((($(date +%s%N) - gen_start) / 1000000))
corpus_bytes=$(du -sb "$SRC" | cut -f1)
src_names=$(msg_names "$SRC")
warm_src_index

# 1. Initial copy. Earlier runs' destinations are retired, not deleted (see retire).
for ((run = 1; run <= runs; run++)); do
  for t in "${sync_tools[@]}" cp; do retire "$W/dst-$t"; done
  if has cp; then fresh_dst cp; measure initial cp "$run"; retire "$W/dst-cp"; fi
  for t in $(rotate "$run" "${sync_tools[@]}"); do fresh_dst "$t"; measure initial "$t" "$run"; done
done

# 2. Re-run with no change.
measure_nochange_runs

# 3. Re-run after a mutation. Every run mutates the current source afresh (seed 1000+run)
# and each tool then syncs its own destination, which the previous step left equal to the
# source as it was before this mutation. So all tools start each run from the same state
# and do the same work, and no pristine copies are needed: restoring a source and three
# destinations would write more data than the runs being measured (a hardlinked snapshot
# is not safe for destinations, where tools append to uidlists and indexes in place).
for ((run = 1; run <= runs; run++)); do
  python3 "$repo/scripts/mutate-corpus.py" "$SRC" --flags 1 --new 0.5 --expunge 0.2 \
    --seed $((1000 + run)) >>"$W/mutations.txt"
  src_names=$(msg_names "$SRC")
  warm_src_index
  for t in $(rotate "$run" "${sync_tools[@]}"); do measure mutated "$t" "$run"; done
done

# Report: medians per scenario and tool.
mkdir -p "$(dirname "$out")"
RUNS=$runs MESSAGES=$messages GEN_MS=$gen_ms CORPUS_BYTES=$corpus_bytes TOOLS=$tools \
  python3 - "$W/results.tsv" "$W/mutations.txt" <<'EOF' | tee "$out"
import os, platform, statistics, subprocess, sys, time
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
mutations = open(sys.argv[2]).read().splitlines()
env = os.environ
SCEN = [("initial", "initial copy"), ("nochange", "re-run, no change"),
        ("mutated", "re-run after mutation")]
NAME = {"mdsync": "mdsync backup", "mdsync-nocache": "mdsync backup --no-cache",
        "rsync": "rsync -a --delete", "doveadm": "doveadm backup", "cp": "cp -a"}

def cmd(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "?"

def medians(scen, tool):
    rs = [r for r in rows if r[0] == scen and r[1] == tool]
    if not rs:
        return None
    if any(r[3] != "ok" for r in rs):
        return "failed"
    col = lambda i: statistics.median(float(r[i]) for r in rs)
    cpu = statistics.median(float(r[5]) + float(r[6]) for r in rs)
    return dict(wall=col(4), cpu=cpu, rss=col(7) / 1024, written=col(8) / 2**20)

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), "?")
mem = int(open("/proc/meminfo").readline().split()[1]) / 2**20
print("# mdsync benchmark, %s\n" % time.strftime("%Y-%m-%d %H:%M %Z"))
print("- corpus: %s messages, %.2f GiB, generated in %.1f s (scripts/gen-corpus.py)" % (
    env["MESSAGES"], int(env["CORPUS_BYTES"]) / 2**30, int(env["GEN_MS"]) / 1000))
print("- machine: %s, %d cores, %.0f GiB RAM, kernel %s" % (cpu, os.cpu_count(), mem,
                                                            platform.release()))
print("- tools: %s; %s; %s" % (cmd("rsync", "--version"), "doveadm " + cmd("dovecot", "--version"),
                               cmd("cp", "--version")))
print("- median of %s run(s) per cell; tools alternate run by run; `sync` before every run" %
      env["RUNS"])
print("- **warm cache**: page cache cannot be dropped here, the corpus stays cached in RAM")
print("- cpu s = user + sys; peak RSS = largest single process of the tool (GNU time %M);")
print("  ratio = wall time / mdsync's wall time in the same scenario")
print("- doveadm: standalone config, `-o maildir_copy_with_hardlinks=no`, source index kept "
      "outside the tree and brought up to date (untimed) before each scenario")
print()
print("| scenario | tool | wall s | cpu s | peak RSS MiB | ratio vs mdsync |")
print("|---|---|---|---|---|---|")
order = ["mdsync", "mdsync-nocache", "rsync", "doveadm", "cp"]
for scen, label in SCEN:
    base = medians(scen, "mdsync")
    for tool in order:
        m = medians(scen, tool)
        if m is None:
            continue
        if m == "failed":
            print("| %s | %s | failed | failed | failed | failed |" % (label, NAME[tool]))
            continue
        ratio = "%.2f" % (m["wall"] / base["wall"]) if isinstance(base, dict) and base["wall"] \
            else "n/a"
        print("| %s | %s | %.2f | %.2f | %.1f | %s |" % (label, NAME[tool], m["wall"], m["cpu"],
                                                         m["rss"], ratio))
print()
print("Bytes written to storage by each tool (write_bytes from /proc/<pid>/io, summed over the")
print("tool's processes: message files plus uidlists, indexes and temp files; median):\n")
print("| scenario | tool | written MiB |")
print("|---|---|---|")
for scen, label in SCEN:
    for tool in order:
        m = medians(scen, tool)
        if m is not None:
            print("| %s | %s | %s |" % (label, NAME[tool],
                                        "failed" if m == "failed" else "%.1f" % m["written"]))
print()
print("Mutations applied to the source before the 'after mutation' runs (one per run):\n")
for line in mutations:
    print("    " + line)
print()
print("<details><summary>all runs</summary>\n")
print("| scenario | tool | run | status | wall s | cpu s | peak RSS MiB | written MiB |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| %s | %s | %s | %s | %s | %.2f | %.1f | %.1f |" % (
        r[0], NAME[r[1]], r[2], r[3], r[4], float(r[5]) + float(r[6]), int(r[7]) / 1024,
        int(r[8]) / 2**20))
print("\n</details>")
EOF
log "report written to $out"

#!/usr/bin/env bash
# bench-mdbox.sh -- benchmark of mdsync on mdbox sources against doveadm backup, in one run.
#
# Usage: scripts/bench-mdbox.sh [--messages N] [--runs N] [--out FILE] [--seed S] [--keep]
#   --messages N  corpus size (default 100000)
#   --runs N      runs of the no-change and the mutation scenarios, median reported (default 3)
#   --out FILE    markdown report, also printed on stdout (default benches/runs/<date>-mdbox.md)
#   --seed S      corpus seed (default 1)
#   --keep        keep the scratch directory (its path is printed)
#   BENCH_DIR     parent of the scratch directory (default: the system temp dir); needs free
#                 disk of about 6x the corpus
#
# Setup (untimed): scripts/gen-corpus.py writes a Maildir++ corpus, `doveadm backup` turns it
# into the mdbox source. Then wall time (read in-process around the run, to 0.1 ms: no-change
# runs take a few ms, below GNU time's 10 ms resolution), CPU time and peak RSS (GNU time), one
# run per cell for the
# initial copy and the scan, the median of --runs runs for the others (tools in rotating order):
#   1. initial copy: mdbox -> Maildir (mdsync backup, doveadm backup) and mdbox -> new mdbox
#      (mdsync backup --to-format mdbox --offline, doveadm backup);
#   2. re-run with nothing changed: mdbox -> Maildir and mdbox -> mdbox (mdsync with
#      --offline, doveadm);
#   3. re-run after 1% flag changes and 0.5% new messages: scripts/mutate-corpus.py changes
#      the Maildir corpus and `doveadm backup` (untimed) carries that into the mdbox source,
#      so the source changed the way Dovecot changes it; then the same tools as in 2 (each
#      run mutates afresh);
#   4. `mdsync scan` of the mdbox source (tables plus the storage health check).
# After every run the destination's message count is compared with the source's; a tool that
# exits non-zero or leaves another count is reported as `failed`. Warm cache (caches cannot be
# dropped here). It never touches anything outside its scratch directory, the --out file and
# cargo's target directory. Run it as root (doveadm drops to the `vmail` user).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
bench_name=bench-mdbox
# shellcheck source=scripts/dovecot-conf.sh
source "$repo/scripts/dovecot-conf.sh"
# shellcheck source=scripts/bench-common.sh
source "$repo/scripts/bench-common.sh"
messages=100000 runs=3 out="" seed=1 keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --messages) messages=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-mdbox: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
out=${out:-$repo/benches/runs/$(date +%Y-%m-%d-%H%M%S)-mdbox.md}

bench_prerequisites
make_scratch mdsync-bench-mdbox
if [ "$keep" = 1 ]; then log "scratch directory: $W (kept)"; else trap 'rm -rf "$W"' EXIT; fi
trap 'exit 130' INT TERM
require_space $((messages * 31 * 1024 * 6))
mkdir -p "$W/logs"
install -d -o vmail -g vmail -m 700 "$W/home"
build_mdsync "$W/logs/cargo-build.log"
[ -n "$mdsync" ] || exit 1
write_dovecot_conf "$W"

MAILDIR=$W/corpus MDBOX=$W/mdbox
# DA LOCATION ARGS...: standalone doveadm on the tree at LOCATION (maildir:... or mdbox:...).
DA() { local loc=$1; shift; env USER=vmail HOME="$W/home" doveadm -c "$W/dovecot.conf" -o "mail_location=$loc" "$@"; }

# Messages in a tree, as mdsync's scanner counts them (Maildir or mdbox).
count() { "$mdsync" scan --json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])'; }

# Sets CMD for tool $1 copying the mdbox source to $2.
tool_cmd() {
  case $1 in
    mdsync-maildir) CMD=("$mdsync" backup --no-progress "$MDBOX" "$2") ;;
    doveadm-maildir) CMD=(env USER=vmail HOME="$W/home" doveadm -c "$W/dovecot.conf"
                          -o "mail_location=mdbox:$MDBOX" backup "maildir:$2") ;;
    mdsync-mdbox) CMD=("$mdsync" backup --no-progress --to-format mdbox --offline "$MDBOX" "$2") ;;
    doveadm-mdbox) CMD=(env USER=vmail HOME="$W/home" doveadm -c "$W/dovecot.conf"
                        -o "mail_location=mdbox:$MDBOX" backup "mdbox:$2") ;;
    mdsync-scan) CMD=("$mdsync" scan --json "$MDBOX") ;;
  esac
}

# measure SCENARIO TOOL [RUN]: run the tool once on its destination, append a line to results.
measure() {
  local scen=$1 tool=$2 run=${3:-1} dst=$W/dst-$2 rc=0 status=ok got
  tool_cmd "$tool" "$dst"
  sync
  local ignored
  # The clock is read in-process around the run (a `date` before and after would add two
  # process starts, 2-3 ms, to runs that take a few ms).
  python3 -c 'import subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write("%.4f\n" % (time.perf_counter() - t))
sys.exit(rc)' "$W/wall.out" /usr/bin/time -f '%e %U %S %M' -o "$W/time.out" "${CMD[@]}" \
    >"$W/logs/$scen-$tool.log" 2>&1 || rc=$?
  wall=0 user=0 sys=0 rss=0
  read -r ignored user sys rss < <(tail -1 "$W/time.out") || true
  read -r wall <"$W/wall.out" || true
  if [ "$rc" -ne 0 ]; then
    status=failed; log "$scen $tool: exit status $rc"; tail -5 "$W/logs/$scen-$tool.log" >&2
  elif [ "$tool" != mdsync-scan ] && got=$(count "$dst") && [ "$got" != "$src_count" ]; then
    status=failed; log "$scen $tool: $got messages in the destination, $src_count in the source"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$tool" "$status" "$wall" "$user" "$sys" \
    "$rss" "$run" >>"$W/results.tsv"
  log "$scen $tool (run $run): $status, wall ${wall}s"
}

log "generating $messages messages, then doveadm backup into mdbox (untimed)"
python3 "$repo/scripts/gen-corpus.py" --messages "$messages" --out "$MAILDIR" --seed "$seed" \
  --owner vmail >"$W/logs/gen-corpus.log"
install -d -o vmail -g vmail -m 700 "$MDBOX"
DA "maildir:$MAILDIR" backup "mdbox:$MDBOX" 2>"$W/logs/setup.log"
corpus_bytes=$(du -sb "$MDBOX" | cut -f1)
src_count=$(count "$MDBOX")

for t in mdsync-maildir doveadm-maildir mdsync-mdbox doveadm-mdbox; do
  case $t in *-maildir|doveadm-mdbox) install -d -o vmail -g vmail -m 700 "$W/dst-$t" ;; esac
done
for t in mdsync-maildir doveadm-maildir mdsync-mdbox doveadm-mdbox; do measure initial "$t"; done
tools4=(mdsync-maildir doveadm-maildir mdsync-mdbox doveadm-mdbox)
for ((run = 1; run <= runs; run++)); do
  for t in $(rotate "$run" "${tools4[@]}"); do measure nochange "$t" "$run"; done
done
measure scan mdsync-scan

for ((run = 1; run <= runs; run++)); do
  python3 "$repo/scripts/mutate-corpus.py" "$MAILDIR" --flags 1 --new 0.5 --expunge 0 \
    --seed $((1000 + run)) >>"$W/mutations.txt"
  DA "maildir:$MAILDIR" backup "mdbox:$MDBOX" 2>>"$W/logs/setup.log"
  src_count=$(count "$MDBOX")
  for t in $(rotate "$run" "${tools4[@]}"); do measure mutated "$t" "$run"; done
done

mkdir -p "$(dirname "$out")"
RUNS=$runs MESSAGES=$messages CORPUS_BYTES=$corpus_bytes python3 - "$W/results.tsv" "$W/mutations.txt" <<'EOF' | tee "$out"
import os, platform, statistics, sys, time
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
env = os.environ
NAME = {"mdsync-maildir": "mdsync backup (mdbox -> Maildir)",
        "doveadm-maildir": "doveadm backup (mdbox -> Maildir)",
        "mdsync-mdbox": "mdsync backup --to-format mdbox --offline (mdbox -> mdbox)",
        "doveadm-mdbox": "doveadm backup (mdbox -> mdbox)",
        "mdsync-scan": "mdsync scan (tables + storage health)"}
PAIR = {"doveadm-maildir": "mdsync-maildir", "doveadm-mdbox": "mdsync-mdbox"}
SCEN = [("initial", "initial copy"), ("nochange", "re-run, no change"),
        ("mutated", "re-run after 1% flags + 0.5% new"), ("scan", "scan")]
# Per cell: the run with the median wall time (a failed run makes the cell failed).
cells = {}
for r in rows:
    cells.setdefault((r[0], r[1]), []).append(r)
get = {}
for key, rs in cells.items():
    bad = [r for r in rs if r[2] != "ok"]
    rs = sorted(rs, key=lambda r: float(r[3]))
    get[key] = bad[0] if bad else rs[(len(rs) - 1) // 2]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), "?")
print("# mdsync mdbox benchmark, %s\n" % time.strftime("%Y-%m-%d %H:%M %Z"))
print("- corpus: %s messages, %.2f GiB as mdbox (gen-corpus.py, then doveadm backup)" % (
    env["MESSAGES"], int(env["CORPUS_BYTES"]) / 2**30))
print("- machine: %s, %d cores (shared with other jobs), kernel %s" % (
    cpu, os.cpu_count(), platform.release()))
print("- initial copy and scan: one run; other cells: median of %s runs (tools in rotating "
      "order); warm cache; `sync` before every run; cpu s = user + sys" % env["RUNS"])
print("- doveadm: 2.3 standalone config; the mdbox source was made by doveadm backup")
print("- ratio = doveadm's wall time / mdsync's for the same destination format "
      "(> 1: mdsync is faster)\n")
print("| scenario | tool | wall s | cpu s | peak RSS MiB | doveadm / mdsync |")
print("|---|---|---|---|---|---|")
for scen, label in SCEN:
    for tool in NAME:
        r = get.get((scen, tool))
        if r is None:
            continue
        if r[2] != "ok":
            print("| %s | %s | failed | | | |" % (label, NAME[tool]))
            continue
        ratio = ""
        m = get.get((scen, PAIR.get(tool, "")))
        if m is not None and m[2] == "ok":
            ratio = "%.1f" % (float(r[3]) / max(float(m[3]), 0.001))
        print("| %s | %s | %.4f | %.2f | %.1f | %s |" % (
            label, NAME[tool], float(r[3]), float(r[4]) + float(r[5]), int(r[6]) / 1024, ratio))
print("\nMutation of the Maildir corpus, carried into the mdbox source by doveadm backup:\n")
for line in open(sys.argv[2]).read().splitlines():
    print("    " + line)
EOF
log "report written to $out"

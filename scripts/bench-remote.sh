#!/usr/bin/env bash
# bench-remote.sh -- benchmark of pushing a Maildir tree to "a remote host" over ssh:
# `mdsync backup SRC host:DST` against rsync, rsync -z and doveadm backup to a dsync-server.
#
# Usage: scripts/bench-remote.sh [--messages N] [--runs R] [--out FILE] [--tools LIST]
#                                [--seed S] [--keep] [--no-netns]
#   --messages N  corpus size (default 100000, about 2.7 GB)
#   --runs R      runs per scenario and tool; the tables show the median (default 3)
#   --out FILE    markdown report, also printed on stdout
#                 (default benches/runs/remote-<date>.md)
#   --tools LIST  comma-separated subset of mdsync,rsync,rsync-z,doveadm (default: all four)
#   --seed S      corpus seed (default 1)
#   --keep        keep the scratch directory (its path is printed)
#   --no-netns    measure on the machine's own loopback instead of a private one (below)
#   BENCH_DIR     parent of the scratch directory (default: the system temp dir); needs free
#                 disk of about 5x the corpus
#
# "The remote host" is 127.0.0.1, reached through a throwaway sshd that the script starts on
# a free port with a fresh host key and user key in the scratch directory (root logs in with
# the key: PermitRootLogin prohibit-password). Every tool pushes the local source to its own
# destination through that sshd, with the same ssh options:
#   mdsync   mdsync backup --no-progress --json -e SSH --remote-mdsync WRAPPER SRC 127.0.0.1:DST
#            (WRAPPER runs the release binary with XDG_CACHE_HOME and HOME in the scratch dir;
#            the local side's cache goes there too, with --cache-dir)
#   rsync    rsync -a --delete --stats -e SSH SRC/ 127.0.0.1:DST/   (rsync-z: the same with -z)
#   doveadm  doveadm backup SSH 127.0.0.1 doveadm dsync-server   (standalone, "current user"
#            mode on both sides, see dovecot-standalone.md; the exact line is in the report)
# Scenarios, as in bench.sh: 1. initial copy into an empty destination (scan caches
# removed first); 2. re-run with no change (also mdsync --no-cache); 3. re-run after
# scripts/mutate-corpus.py --flags 1 --new 0.5 --expunge 0.2 (a fresh seed each run). Tools
# alternate run by run, every run starts after `sync`, all runs are warm-cache.
#
# Per run it records wall time (GNU time), the client's CPU time, and the bytes on the wire:
# the growth of the loopback interface's receive counter (`lo` rx_bytes in /proc/net/dev)
# around the run, the same measure for every tool. It counts each packet once with its
# headers (link, IP, TCP), ssh's key exchange, encryption and MACs, and TCP's ACKs, in both
# directions. By default the script re-runs itself in a private network namespace
# (unshare --net) where only its own traffic crosses `lo`; with --no-netns, or where that is
# not possible, it uses the machine's `lo`, and the machine must be otherwise idle (other
# traffic on 127.0.0.1 adds to the figures). It also records what the tools report:
# mdsync's wire_bytes_sent + wire_bytes_received (--json), rsync's total bytes sent +
# received (--stats), both counted above ssh. After every run the destination's set of
# message base names is compared with the source's; a tool that exits non-zero or leaves a
# different set is reported as `failed`, and the end of its stderr goes into the report.
# For each mutation it reports the new messages' bytes, raw and zstd -3 compressed (one
# frame per message, one per 256 KiB chunk as mdsync frames bodies, and as one stream; needs
# the zstd CLI), and the number of changed messages, to compare mdsync's bytes with
# "compressed new bytes + 64 bytes per changed message"; and the whole corpus compressed,
# for the initial copy.
#
# A destination is never deleted between runs: it is retired (see bench-common.sh) and
# removed at exit, so no run creates its files where another run's were just deleted.
#
# Client and server run on the same machine and share its CPUs: the wall times include the
# far side's work and both ends of ssh's encryption. It never touches anything outside its
# scratch directory, the --out file and cargo's target directory (it creates /run/sshd when
# missing, as sshd needs it), never reads /etc/ssh or ~/.ssh, and stops only the sshd it
# started and that sshd's per-connection processes, by PID. Run it as root.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/dovecot-conf.sh
source "$repo/scripts/dovecot-conf.sh"
# shellcheck source=scripts/bench-common.sh
source "$repo/scripts/bench-common.sh"
bench_name=bench-remote
all_args=("$@")
messages=100000 runs=3 out="" tools="mdsync,rsync,rsync-z,doveadm" seed=1 keep=0 netns=1
while [ $# -gt 0 ]; do
  case $1 in
    --messages) messages=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tools) tools=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --no-netns) netns=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) log "unknown argument $1 (see --help)"; exit 2 ;;
  esac
done
out=${out:-$repo/benches/runs/remote-$(date +%Y-%m-%d-%H%M%S).md}
for t in ${tools//,/ }; do
  case $t in mdsync|rsync|rsync-z|doveadm) ;; *) log "unknown tool $t"; exit 2 ;; esac
done

if [ -z "${BENCH_REMOTE_SCRATCH:-}" ]; then
  # First stage: checks, scratch directory and build, with the machine's network (cargo or
  # apt may need it); then, unless --no-netns, the rest runs in a private network namespace.
  bench_prerequisites
  for f in /usr/sbin/sshd /usr/bin/ssh /usr/bin/ssh-keygen; do
    [ -x "$f" ] || { log "$f is missing (apt-get install openssh-server)"; exit 2; }
  done
  make_scratch mdsync-bench-remote
  if [ "$keep" = 1 ]; then log "scratch directory: $W (kept)"; else trap 'rm -rf "$W"' EXIT; fi
  trap 'exit 130' INT TERM
  # The ssh command line travels as one string (-e): no whitespace or quotes in paths.
  [[ $W =~ ^[A-Za-z0-9_./+-]+$ ]] || { log "scratch path $W needs a plain BENCH_DIR"; exit 2; }
  # Source + 4 destinations per run (retired ones are kept until exit), ~28 KiB per
  # message plus file system overhead.
  require_space $((messages * 31 * 1024 * (1 + 4 * runs)))
  mkdir -p "$W/logs" "$W/bin"
  mdsync=""
  if has mdsync; then
    build_mdsync "$W/logs/cargo-build.log"
    # A private copy: someone else's build may replace target/release/mdsync meanwhile.
    if [ -n "$mdsync" ]; then cp "$mdsync" "$W/bin/mdsync"; mdsync=$W/bin/mdsync; fi
  fi
  git -C "$repo" log -1 --format='%h %s' >"$W/git-head.txt" 2>/dev/null || echo "?" >"$W/git-head.txt"
  git -C "$repo" status --short -- src Cargo.toml Cargo.lock >"$W/git-dirty.txt" 2>/dev/null || true
  if [ "$netns" = 1 ]; then
    if unshare --net true 2>/dev/null; then
      trap - EXIT
      exec unshare --net -- env BENCH_REMOTE_SCRATCH="$W" BENCH_REMOTE_MDSYNC="$mdsync" \
        bash "$0" "${all_args[@]}"
    fi
    log "cannot make a network namespace (unshare --net); measuring on the shared lo"
    netns=0
  fi
  lo_scope="the machine's own loopback: any other traffic on 127.0.0.1 during a run counts too"
else
  # Second stage, inside `unshare --net`: only this benchmark's traffic crosses lo.
  W=$BENCH_REMOTE_SCRATCH mdsync=$BENCH_REMOTE_MDSYNC
  ip link set lo up
  lo_scope="a private network namespace (unshare --net): only this benchmark's traffic"
fi
unset SSH_AUTH_SOCK

sshd_pid="" sshd_start=""
cleanup() {
  stop_sshd
  if [ "$keep" = 1 ]; then log "scratch directory: $W (kept)"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SRC=$W/src
mkdir -p "$W/logs" "$W/run" "$W/cache"
install -d -o vmail -g vmail -m 700 "$W/home" "$W/home-remote" "$W/src-index"

# The throwaway sshd: start_sshd, stop_sshd (the same setup as tests/support/sshd.rs).
# shellcheck source=scripts/bench-sshd.sh
source "$repo/scripts/bench-sshd.sh"

# Bytes received on lo so far (every packet crossing loopback is received once).
lo_bytes() {
  local line
  while IFS= read -r line; do
    if [[ $line =~ ^[[:space:]]*lo:[[:space:]]*([0-9]+) ]]; then echo "${BASH_REMATCH[1]}"; return; fi
  done </proc/net/dev
  echo 0
}

log "starting sshd on 127.0.0.1"
start_sshd
log "sshd on 127.0.0.1:$port (pid $sshd_pid); measuring the bare connection"
ssh_cipher=$("${SSH[@]}" -v 127.0.0.1 true 2>&1 </dev/null |
  sed -n 's/.*kex: client->server cipher: \([^ ]*\).*/\1/p' | head -1) || true
for ((i = 1; i <= 5; i++)); do
  b0=$(lo_bytes); t0=$(date +%s%N)
  "${SSH[@]}" 127.0.0.1 true </dev/null
  t1=$(date +%s%N); b1=$(lo_bytes)
  printf '%s\t%s\n' $(((t1 - t0) / 1000)) $((b1 - b0)) >>"$W/connect.tsv"
done

# mdsync on "the remote host": its scan cache goes to the scratch directory, not ~/.cache.
cat >"$W/bin/mdsync-remote" <<WRAP
#!/bin/sh
XDG_CACHE_HOME=$W/cache/remote HOME=$W/cache/remote
export XDG_CACHE_HOME HOME
exec ${mdsync:-false} "\$@"
WRAP
chmod 755 "$W/bin/mdsync-remote"

# Standalone doveadm on both ends (dovecot-standalone.md), "current user" mode: USER and
# HOME in the environment, no -u (that needs an auth service). Run as root, it starts the
# ssh command as root and drops to vmail (mail_uid) for the mail; the dsync-server is
# started by root's ssh session and drops to vmail the same way. The source's indexes live
# in $W/src-index (as in bench.sh), the destination keeps its indexes inside.
write_dovecot_conf "$W"
DA_SRC=(env USER=vmail HOME="$W/home" doveadm -c "$W/dovecot.conf"
        -o "mail_location=maildir:$SRC:INDEX=$W/src-index")
warm_src_index() {
  if has doveadm; then "${DA_SRC[@]}" mailbox status messages '*' >/dev/null; fi
}

# Sets CMD to the command of tool $1 pushing $SRC to 127.0.0.1:$2.
tool_cmd() {
  case $1 in
    mdsync) CMD=("${mdsync:-false}" backup --no-progress --json --cache-dir "$W/cache/local"
                 -e "$RSH" --remote-mdsync "$W/bin/mdsync-remote" "$SRC" "127.0.0.1:$2") ;;
    mdsync-nocache) CMD=("${mdsync:-false}" backup --no-progress --json --no-cache
                         -e "$RSH" --remote-mdsync "$W/bin/mdsync-remote" "$SRC" "127.0.0.1:$2") ;;
    rsync) CMD=(rsync -a --delete --stats -e "$RSH" "$SRC/" "127.0.0.1:$2/") ;;
    rsync-z) CMD=(rsync -a --delete --stats -z -e "$RSH" "$SRC/" "127.0.0.1:$2/") ;;
    # doveadm stops parsing its own options at the first word of the command (`ssh`).
    doveadm) CMD=("${DA_SRC[@]}" backup "${SSH[@]}" 127.0.0.1
                  env USER=vmail HOME="$W/home-remote" doveadm -c "$W/dovecot.conf"
                  -o "mail_location=maildir:$2" dsync-server) ;;
  esac
}

# A command line as a shell would read it (words with odd characters single-quoted).
quote_cmd() {
  local w q=()
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then q+=("$w"); else q+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${q[*]}"
}

# Bytes the tool itself says it moved, from its output $2, and a note: mdsync's
# wire_bytes_sent + wire_bytes_received and messages_copied/unchanged_mailboxes, rsync's
# total bytes sent + received.
tool_bytes() {
  case $1 in
    mdsync*) python3 -c 'import json, sys
try:
    d = json.load(open(sys.argv[1]))
    print(d["wire_bytes_sent"] + d["wire_bytes_received"],
          "%d/%d" % (d["messages_copied"], d["unchanged_mailboxes"]))
except Exception:
    print("- -")' "$2" ;;
    rsync*) awk '/^Total bytes (sent|received):/ { gsub(",", "", $4); s += $4; n++ }
                 END { if (n) print s, "-"; else print "- -" }' "$2" ;;
    *) echo "- -" ;;
  esac
}

# measure SCENARIO TOOL RUN: run the tool once on its destination, append a line to results.
measure() {
  local scen=$1 tool=$2 run=$3 dst=$W/dst-${2%-nocache} rc=0 status=ok b0 b1 base tb copied
  base=$W/logs/$scen-$tool-$run
  tool_cmd "$tool" "$dst"
  [ -f "$W/cmd-$tool" ] || quote_cmd "${CMD[@]}" >"$W/cmd-$tool"
  sync
  b0=$(lo_bytes)
  /usr/bin/time -f '%e %U %S %M' -o "$W/time.out" "${CMD[@]}" \
    <"/dev/null" >"$base.out" 2>"$base.err" || rc=$?
  b1=$(lo_bytes)
  wall=0 user=0 sys=0 rss=0
  read -r wall user sys rss < <(tail -1 "$W/time.out") || true
  read -r tb copied < <(tool_bytes "$tool" "$base.out")
  if [ "$rc" -ne 0 ]; then
    status=failed; log "$scen $tool run $run: exit status $rc; last lines of its stderr:"
    tail -5 "$base.err" >&2
    { echo "### $scen, $tool, run $run: exit status $rc"; echo; echo '```'
      tail -40 "$base.err"; echo '```'; echo; } >>"$W/failures.md"
  elif [ "$(msg_names "$dst")" != "$src_names" ]; then
    status=failed; log "$scen $tool run $run: destination messages differ from the source"
    { echo "### $scen, $tool, run $run: destination messages differ from the source"; echo
      echo '```'; tail -40 "$base.err"; echo '```'; echo; } >>"$W/failures.md"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$tool" "$run" "$status" \
    "$wall" "$user" "$sys" "$rss" "$((b1 - b0))" "$tb" "$copied" >>"$W/results.tsv"
  log "$scen $tool run $run: $status, wall ${wall}s, lo $((b1 - b0)) bytes"
}

sync_tools=()
for t in mdsync rsync rsync-z doveadm; do has "$t" && sync_tools+=("$t"); done
fresh_dst() { retire "$W/dst-$1"; install -d -o vmail -g vmail -m 700 "$W/dst-$1"; }
# Message files of the source, "path<TAB>size", for the mutation statistics.
list_src() { find "$SRC" \( -path '*/cur/*' -o -path '*/new/*' \) -type f -printf '%P\t%s\n' >"$1"; }

if has rsync-z; then
  rsync_z=$(rsync -anz --debug=nstr -e "$RSH" "$W/ssh/" "127.0.0.1:$W/nstr-probe/" 2>&1 |
    sed -n 's/.*negotiated compress: //p' | head -1) || true
fi

log "generating $messages messages in $SRC"
gen_start=$(date +%s%N)
python3 "$repo/scripts/gen-corpus.py" --messages "$messages" --out "$SRC" --seed "$seed" \
  --owner vmail >"$W/logs/gen-corpus.log"
gen_ms=$((($(date +%s%N) - gen_start) / 1000000))
corpus_bytes=$(du -sb "$SRC" | cut -f1)
corpus_zstd="- -"
if command -v zstd >/dev/null; then
  # The messages compressed with zstd -3, one frame per message and as one stream (untimed).
  corpus_zstd="$(find "$SRC" \( -path '*/cur/*' -o -path '*/new/*' \) -type f -print0 |
    xargs -0 zstd -3 -q -c | wc -c) $(find "$SRC" \( -path '*/cur/*' -o -path '*/new/*' \) \
    -type f -print0 | LC_ALL=C sort -z | xargs -0 cat | zstd -3 -q -c | wc -c)"
fi
src_names=$(msg_names "$SRC")
warm_src_index

# 1. Initial copy. The scan caches go too: a first copy has none.
for ((run = 1; run <= runs; run++)); do
  for t in "${sync_tools[@]}"; do retire "$W/dst-$t"; done
  for t in $(rotate "$run" "${sync_tools[@]}"); do
    rm -rf "$W/cache/local" "$W/cache/remote"
    fresh_dst "$t"; measure initial "$t" "$run"
  done
done

# 2. Re-run with no change.
measure_nochange_runs

# 3. Re-run after a mutation; every tool starts each run from the same state (see bench.sh).
for ((run = 1; run <= runs; run++)); do
  list_src "$W/before.tsv"
  python3 "$repo/scripts/mutate-corpus.py" "$SRC" --flags 1 --new 0.5 --expunge 0.2 \
    --seed $((1000 + run)) >>"$W/mutations.txt"
  list_src "$W/after.tsv"
  # What changed: new, expunged and renamed (flags) messages by base name; the new
  # messages' bytes raw and zstd -3 compressed: one frame per message, one frame per 256 KiB
  # chunk (mdsync's body framing) and as one stream.
  python3 - "$run" "$W/before.tsv" "$W/after.tsv" "$SRC" >>"$W/mutation-bytes.tsv" <<'EOF'
import os, shutil, subprocess, sys
run, before, after, src = sys.argv[1:]
def load(path):
    files = {}
    for line in open(path):
        rel, size = line.rstrip("\n").split("\t")
        files[os.path.basename(rel).split(":")[0]] = (rel, int(size))
    return files
b, a = load(before), load(after)
new = [a[k][0] for k in a.keys() - b.keys()]
flags = sum(1 for k in a.keys() & b.keys() if a[k][0] != b[k][0])
raw = sum(a[k][1] for k in a.keys() - b.keys())
frames = chunks = stream = "-"
if shutil.which("zstd"):
    zstd = lambda data: len(subprocess.run(["zstd", "-3", "-q", "-c"], input=data,
                                           capture_output=True, check=True).stdout)
    bodies = [open(os.path.join(src, rel), "rb").read() for rel in sorted(new)]
    frames, stream = sum(zstd(x) for x in bodies), zstd(b"".join(bodies))
    # mdsync's framing: one zstd frame per 256 KiB body chunk
    chunks = sum(zstd(x[i:i + (256 << 10)]) for x in bodies for i in range(0, max(len(x), 1), 256 << 10))
print(run, len(new), len(b.keys() - a.keys()), flags, raw, frames, chunks, stream, sep="\t")
EOF
  src_names=$(msg_names "$SRC")
  warm_src_index
  for t in $(rotate "$run" "${sync_tools[@]}"); do measure mutated "$t" "$run"; done
done
stop_sshd

# Report.
mkdir -p "$(dirname "$out")"
for t in mdsync mdsync-nocache rsync rsync-z doveadm; do
  if [ -f "$W/cmd-$t" ]; then printf '%s\t%s\n' "$t" "$(cat "$W/cmd-$t")"; fi
done >"$W/commands.tsv"
touch "$W/failures.md" "$W/mutation-bytes.tsv"
RUNS=$runs MESSAGES=$messages GEN_MS=$gen_ms CORPUS_BYTES=$corpus_bytes SCRATCH=$W \
  CORPUS_ZSTD=$corpus_zstd \
  ARGS="scripts/bench-remote.sh $(quote_cmd "${all_args[@]}")" LO_SCOPE=$lo_scope \
  SSH_CIPHER=${ssh_cipher:-?} RSYNC_Z=${rsync_z:-?} ZSTD=$(command -v zstd || true) \
  python3 - <<'EOF' | tee "$out"
import os, platform, statistics, subprocess, time
env = os.environ
W = env["SCRATCH"]
rd = lambda name: open(os.path.join(W, name)).read()
rows = [l.split("\t") for l in rd("results.tsv").splitlines()]
connect = [tuple(map(int, l.split("\t"))) for l in rd("connect.tsv").splitlines()]
mutations = rd("mutations.txt").splitlines()
mbytes = [l.split("\t") for l in rd("mutation-bytes.tsv").splitlines()]
commands = [l.split("\t", 1) for l in rd("commands.tsv").splitlines()]
SCEN = [("initial", "initial copy"), ("nochange", "re-run, no change"),
        ("mutated", "re-run after mutation")]
NAME = {"mdsync": "mdsync backup", "mdsync-nocache": "mdsync backup --no-cache",
        "rsync": "rsync -a --delete", "rsync-z": "rsync -a --delete -z",
        "doveadm": "doveadm backup"}
ORDER = ["mdsync", "mdsync-nocache", "rsync", "rsync-z", "doveadm"]

def first_line(*a):
    try:
        p = subprocess.run(a, capture_output=True, text=True)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except Exception:
        return "?"

def human(n):
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return "%.2f %s" % (n / scale, unit)
    return "%d B" % n

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

num = lambda s: None if s == "-" else float(s)

def medians(scen, tool):
    rs = [r for r in rows if r[0] == scen and r[1] == tool]
    if not rs:
        return None
    if any(r[3] != "ok" for r in rs):
        return "failed"
    return dict(wall=med(float(r[4]) for r in rs), cpu=med(float(r[5]) + float(r[6]) for r in rs),
                lo=med(int(r[8]) for r in rs), own=med(num(r[9]) for r in rs))

def ratio(a, b):
    return "%.2f" % (a / b) if a is not None and b else "n/a"

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), "?")
mem = int(open("/proc/meminfo").readline().split()[1]) / 2**20
head = rd("git-head.txt").strip()
dirty = rd("git-dirty.txt").split("\n") if os.path.exists(os.path.join(W, "git-dirty.txt")) else []
dirty = [d for d in dirty if d.strip()]
print("# mdsync remote benchmark (push over ssh to 127.0.0.1), %s\n" %
      time.strftime("%Y-%m-%d %H:%M %Z"))
print("- command: `%s`" % env["ARGS"])
print("- corpus: %s messages, %.2f GiB, generated in %.1f s (scripts/gen-corpus.py)" % (
    env["MESSAGES"], int(env["CORPUS_BYTES"]) / 2**30, int(env["GEN_MS"]) / 1000))
frames, stream = env["CORPUS_ZSTD"].split()
if frames != "-":
    print("- corpus messages compressed with zstd -3: %s one frame per message, %s as one "
          "stream (for the initial copy's bytes)" % (human(int(frames)), human(int(stream))))
print("- machine: %s, %d cores, %.0f GiB RAM, kernel %s; client and server share it" % (
    cpu, os.cpu_count(), mem, platform.release()))
print("- mdsync: release build of %s%s" % (head, "; **working tree differs in %s**" %
      ", ".join(d.split()[-1] for d in dirty) if dirty else ""))
print("- tools: %s; %s; doveadm %s" % (first_line("ssh", "-V"), first_line("rsync", "--version"),
                                      first_line("dovecot", "--version")))
print("- ssh: throwaway sshd on 127.0.0.1, cipher %s, no ssh compression; rsync -z "
      "negotiated %s; mdsync compresses with zstd -3 (its default)" % (env["SSH_CIPHER"],
                                                                        env["RSYNC_Z"]))
print("- bare ssh connection (`ssh ... 127.0.0.1 true`, median of %d): **%.0f ms**, %s on lo"
      % (len(connect), med(c[0] for c in connect) / 1000, human(med(c[1] for c in connect))))
print("- median of %s run(s) per cell; tools alternate run by run; `sync` before every run; "
      "warm page cache" % env["RUNS"])
print("- bytes on the wire = growth of `lo` rx_bytes (/proc/net/dev) during the run, measured "
      "on %s. It counts every packet once with link, IP and TCP headers, TCP ACKs, ssh's key "
      "exchange, framing and MACs, both directions" % env["LO_SCOPE"])
print("- tool's own count: mdsync `wire_bytes_sent + wire_bytes_received` (--json), rsync "
      "`Total bytes sent + received` (--stats); both above ssh. doveadm reports none")
print("- ratios: the tool's figure / mdsync's in the same scenario; cpu s = the client's "
      "user + sys (ssh client included, the far side not)")
print("- mdsync's pair state never trusts a stamp within 2 s of the scan that took it, so the "
      "first re-run right after a copy still reads every mailbox of both sides; the last "
      "column of 'all runs' shows how many mailboxes a run skipped as unchanged")
print()
print("| scenario | tool | wall s | wall vs mdsync | bytes on lo | lo bytes vs mdsync "
      "| tool's own count | client cpu s |")
print("|---|---|---|---|---|---|---|---|")
for scen, label in SCEN:
    base = medians(scen, "mdsync")
    base = base if isinstance(base, dict) else {}
    for tool in ORDER:
        m = medians(scen, tool)
        if m is None:
            continue
        if m == "failed":
            print("| %s | %s | failed | | failed | | | |" % (label, NAME[tool]))
            continue
        print("| %s | %s | %.2f | %s | %s | %s | %s | %.2f |" % (
            label, NAME[tool], m["wall"], ratio(m["wall"], base.get("wall")), human(m["lo"]),
            ratio(m["lo"], base.get("lo")), human(m["own"]), m["cpu"]))
print()
print("Mutations applied to the source before the 'after mutation' runs (one per run):\n")
for line in mutations:
    print("    " + line)
if mbytes:
    print()
    print("What mdsync would ideally send per mutation: the new messages compressed "
          "(zstd -3, one frame per message) + 64 bytes per changed message (new + expunged + "
          "flag change). mdsync compresses each 256 KiB chunk of a body as its own frame; the "
          "per-chunk column shows what that framing alone costs. %s\n" %
          ("" if env["ZSTD"] else "(zstd CLI not found: compressed sizes skipped)"))
    print("| run | new msgs | new raw | zstd -3 per msg | zstd -3 per 256 KiB chunk "
          "| zstd -3 one stream | changed msgs | ideal (per msg + 64 B/change) "
          "| mdsync own count | own - ideal | mdsync on lo |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run, new, exp, flags, raw, frames, chunks, stream in mbytes:
        changed = int(new) + int(exp) + int(flags)
        ideal = int(frames) + 64 * changed if frames != "-" else None
        md = [r for r in rows if r[0] == "mutated" and r[1] == "mdsync" and r[2] == run]
        own = num(md[0][9]) if md else None
        over = "%+d B" % (own - ideal) if own is not None and ideal is not None else "n/a"
        lo = human(int(md[0][8])) if md else "n/a"
        print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            run, new, human(int(raw)), human(num(frames)), human(num(chunks)), human(num(stream)),
            changed, human(ideal), human(own), over, lo))
print()
print("Commands (W = the scratch directory, $BENCH_DIR/mdsync-bench-remote.XXXXXX; SRC = $W/src):\n")
for tool, cmd in commands:
    print("- %s:\n\n      %s\n" % (NAME[tool], cmd.replace(W, "$W")))
failures = rd("failures.md")
if failures.strip():
    print("## Failures\n")
    print(failures.replace(W, "$W"))
print("<details><summary>all runs</summary>\n")
print("| scenario | tool | run | status | wall s | client cpu s | client peak RSS MiB "
      "| bytes on lo | tool's own count | mdsync: copied/unchanged mailboxes |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| %s | %s | %s | %s | %s | %.2f | %.1f | %s | %s | %s |" % (
        r[0], NAME[r[1]], r[2], r[3], r[4], float(r[5]) + float(r[6]), int(r[7]) / 1024,
        r[8], r[9], r[10]))
print("\n</details>")
EOF
log "report written to $out"

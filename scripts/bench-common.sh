#!/usr/bin/env bash
# shellcheck disable=SC2034,SC2154  # repo and tools come from, mdsync and W go to, the caller
# bench-common.sh: sourced by bench.sh (local) and bench-remote.sh (over ssh). Shared pieces:
# logging, the root/vmail/GNU time prerequisites, the scratch directory, the free-space
# check, the release build, the message-name fingerprint of a tree and the run order.
# The sourcing script sets `bench_name` (the log prefix, default "bench") and `tools` (the
# comma-separated tool list `has` looks in). Nothing here writes outside the scratch
# directory and cargo's target directory.

log() { echo "${bench_name:-bench}: $*" >&2; }
has() { [[ ",$tools," == *",$1,"* ]]; }

# Exits unless run as root with a `vmail` user; installs GNU time when it is missing.
bench_prerequisites() {
  [ "$(id -u)" -eq 0 ] || { log "run me as root (doveadm drops to vmail; trees are chowned)"; exit 2; }
  id vmail >/dev/null 2>&1 || { log "the vmail user is missing (see dovecot-standalone.md)"; exit 2; }
  if ! [ -x /usr/bin/time ]; then
    log "installing GNU time"
    apt-get install -y --no-install-recommends time >/dev/null ||
      { apt-get update >/dev/null && apt-get install -y --no-install-recommends time >/dev/null; }
  fi
}

# make_scratch NAME: sets W to a fresh NAME.XXXXXX directory under BENCH_DIR (default: the
# system temp dir), world-readable: doveadm runs as vmail and must reach the trees.
make_scratch() {
  W=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/$1.XXXXXX")
  chmod 755 "$W"
}

# require_space BYTES: exits unless $W's file system has BYTES free.
require_space() {
  local avail
  avail=$(df -B1 --output=avail "$W" | tail -1)
  if [ "$avail" -lt "$1" ]; then
    log "need about $(($1 >> 30)) GiB free in $W, have $((avail >> 30)) GiB"; exit 1
  fi
}

# build_mdsync LOG: `cargo build --release` in the repo, output to LOG; sets mdsync to the
# binary, or to "" (and says so) when the build fails.
build_mdsync() {
  mdsync=""
  log "cargo build --release"
  if (cd "$repo" && cargo build --release) >"$1" 2>&1; then
    mdsync=${CARGO_TARGET_DIR:-$repo/target}/release/mdsync
  else
    log "cargo build failed; mdsync will be reported as failed"; tail -5 "$1" >&2
  fi
}

# retire DIR: moves a finished destination into $W/retired instead of deleting it; the
# scratch directory goes at exit. On ext4 without a journal the kernel avoids reusing inodes
# freed in the last minutes and checks each of them on every file creation: a tree created
# right after 100,000 files were deleted paid about 0.6 ms a file instead of 20 us.
retire() {
  [ -e "$1" ] || return 0
  mkdir -p "$W/retired"
  mv "$1" "$(mktemp -u "$W/retired/$(basename "$1").XXXXXX")"
}

# Message base names of a tree (file names in */cur and */new up to the first ':').
msg_names() {
  find "$1" \( -path '*/cur/*' -o -path '*/new/*' \) -type f -printf '%f\n' \
    | sed 's/:.*//' | LC_ALL=C sort | md5sum
}

# rotate N WORD...: the words, starting at index N mod count (alternates who goes first).
rotate() {
  local n=$1; shift; local a=("$@") i
  for ((i = 0; i < ${#a[@]}; i++)); do echo "${a[(i + n) % ${#a[@]}]}"; done
}

# Scenario 2 of both benchmarks: each sync tool of sync_tools (mdsync also with --no-cache)
# re-runs `runs` times with nothing changed, alternating who goes first. Uses the calling
# script's `measure`.
measure_nochange_runs() {
  local run t nochange=()
  for t in "${sync_tools[@]}"; do
    nochange+=("$t")
    if [ "$t" = mdsync ]; then nochange+=(mdsync-nocache); fi
  done
  for ((run = 1; run <= runs; run++)); do
    for t in $(rotate "$run" "${nochange[@]}"); do measure nochange "$t" "$run"; done
  done
}

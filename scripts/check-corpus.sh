#!/usr/bin/env bash
# check-corpus.sh -- check a corpus from gen-corpus.py against real Dovecot (doveadm, no daemon).
#
# Usage: scripts/check-corpus.sh DIR MANIFEST
#   DIR       a tree made by `gen-corpus.py --out DIR --manifest MANIFEST`
#   MANIFEST  the manifest written at the same time
#
# Copies DIR into a scratch directory (mktemp -d) and, on the copy, with a throw-away
# doveadm config (mail as the `vmail` user, see dovecot-standalone.md):
#   1. `mailbox status 'messages uidnext uidvalidity guid' '*'` must equal the manifest;
#   2. `fetch 'mailbox uid guid flags' all` must equal the manifest (\Recent ignored);
#   3. `force-resync '*'`, then 1 and 2 again;
#   4. every file of the tree except Dovecot's index files (dovecot.index*, dovecot.list.index*,
#      dovecot.mailbox.log*) must still be byte-for-byte what the generator wrote.
#   5. every `,S=` / `,W=` in a file name equals the file's size / size with CRLF line ends.
# Exit status 0 when all checks pass.
#
# It never modifies DIR and removes its scratch directory on exit. Run it as root with
# doveadm installed and a `vmail` user.
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 DIR MANIFEST" >&2; exit 2; }
src=$(realpath "$1")
manifest=$(realpath "$2")

# shellcheck source=scripts/dovecot-conf.sh
source "$(cd "$(dirname "$0")" && pwd)/dovecot-conf.sh"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
chmod 755 "$T"
write_dovecot_conf "$T"
cp -a "$src" "$T/copy"
da() { USER=vmail HOME="$T/copy" doveadm -f tab -c "$T/dovecot.conf" \
         -o "mail_location=maildir:$T/copy" "$@"; }

# Expected lines from the manifest, in the same shape as the normalized doveadm output.
awk -F'\t' '$1 == "mailbox" { print $2 "\t" $3 "\t" $4 "\t" $5 "\t" $6 }' "$manifest" \
  | sort >"$T/want-status"
awk -F'\t' '$1 == "mail" { print $2 "\t" $3 "\t" $4 "\t" $5 }' "$manifest" \
  | sort >"$T/want-fetch"
# doveadm fetch: drop \Recent (files in new/) and sort the flag names.
normalize_flags() {
  python3 -c '
import sys
for line in sys.stdin:
    box, uid, guid, flags = line.rstrip("\n").split("\t")
    flags = " ".join(sorted(f for f in flags.split() if f != "\\Recent"))
    print("\t".join((box, uid, guid, flags)))'
}

failed=0
check() {  # $1 = label
  da mailbox status 'messages uidnext uidvalidity guid' '*' | tail -n +2 | sort >"$T/got-status"
  da fetch 'mailbox uid guid flags' all | tail -n +2 | normalize_flags | sort >"$T/got-fetch"
  if diff "$T/want-status" "$T/got-status" >"$T/diff"; then
    echo "ok   $1: mailbox status of $(wc -l <"$T/got-status") mailboxes matches"
  else
    echo "FAIL $1: mailbox status differs (< wanted, > doveadm):"; head -20 "$T/diff"; failed=1
  fi
  if diff "$T/want-fetch" "$T/got-fetch" >"$T/diff"; then
    echo "ok   $1: uid, guid and flags of $(wc -l <"$T/got-fetch") messages match"
  else
    echo "FAIL $1: fetch differs (< wanted, > doveadm):"; head -20 "$T/diff"; failed=1
  fi
}

check "first read"
da force-resync '*' >/dev/null
check "after force-resync"
if diff -r --exclude='dovecot.index*' --exclude='dovecot.list.index*' \
     --exclude='dovecot.mailbox.log*' "$src" "$T/copy" >"$T/diff"; then
  echo "ok   files: Dovecot changed no file of the tree (its index files aside)"
else
  echo "FAIL files: Dovecot changed the tree:"; head -20 "$T/diff"; failed=1
fi
if python3 - "$src" <<'EOF'
import os, re, sys
bad = 0
for dirpath, _, names in os.walk(sys.argv[1]):
    for name in names:
        m = re.search(r",S=(\d+),W=(\d+)", name)
        if m:
            data = open(os.path.join(dirpath, name), "rb").read()
            bad += (int(m[1]), int(m[2])) != (len(data), len(data) + data.count(b"\n"))
sys.exit(bad > 0)
EOF
then
  echo "ok   sizes: every ,S= and ,W= matches its file"
else
  echo "FAIL sizes: some ,S= or ,W= do not match their file"; failed=1
fi
exit $failed

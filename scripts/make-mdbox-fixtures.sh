#!/usr/bin/env bash
# make-mdbox-fixtures.sh: rebuilds the small real mdbox trees under testdata/mdbox/ with the
# installed Dovecot (doveadm standalone, no dovecot service), and beside each tree what
# Dovecot itself reports about it (`doveadm fetch`, `mailbox status`) for the tests.
# It only writes inside a fresh temp dir and testdata/mdbox/; it never touches src/, the
# user's mail or any Dovecot service.
#
# Usage (as root, Dovecot 2.3 installed, system user `vmail` present):
#     bash scripts/make-mdbox-fixtures.sh
#
# Trees:
#   live/    saves into five folders (m.N files rotated at 2 KiB so there are several),
#            system flags and keywords, copies between folders (refcount 2), expunges that
#            leave refcount-0 messages behind; index snapshots (dovecot.index,
#            dovecot.map.index) written half-way, so later changes live only in the logs.
#   purged/  live/ after `doveadm purge`: refcount-0 messages gone, files rewritten.
#   resynced/ live/ after `doveadm force-resync` (which writes the map index snapshot
#            dovecot.map.index), plus one more save and flag change in the logs.
# Not fixed between rebuilds: GUIDs, UIDVALIDITYs, timestamps. Tests read the expected
# files, never hard-code those.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/dovecot-conf.sh
source "$repo/scripts/dovecot-conf.sh"
out=$repo/testdata/mdbox

die() { echo "make-mdbox-fixtures: $*" >&2; exit 1; }

check_prerequisites() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (doveadm drops to the vmail user)"
    command -v doveadm >/dev/null || die "doveadm not found: apt-get install dovecot-core"
    id vmail >/dev/null 2>&1 || die "system user vmail missing (scripts/test.sh creates it)"
}

# DA ARGS...: doveadm on the tree $ROOT as the vmail user; small m.N files.
DA() {
    USER=vmail HOME=$ROOT doveadm -c "$T/dovecot.conf" -o "mail_location=mdbox:$ROOT" \
        -o mdbox_rotate_size=2k "$@"
}

# DA_SNAPSHOT ARGS...: like DA, but makes Dovecot rewrite the index snapshots it touches.
DA_SNAPSHOT() {
    DA -o mail_index_rewrite_min_log_bytes=1 -o mail_index_rewrite_max_log_bytes=1 "$@"
}

# message ID SUBJECT DAY [BODY_LINES]: a complete RFC 5322 message on stdout.
message() {
    local id=$1 subject=$2 day=$3 lines=${4:-2} n
    printf 'From: alice@example.org\nTo: bob@example.org\nSubject: %s\n' "$subject"
    printf 'Date: Mon, %02d Jan 2024 10:00:00 +0100\n' "$day"
    printf 'Message-ID: <%s@fixture.mdsync.test>\n\n' "$id"
    for ((n = 1; n <= lines; n++)); do
        printf '%s line %04d: the quick brown fox jumps over the lazy dog\n' "$id" "$n"
    done
}

save() { message "$2" "$3" "$4" "${5:-2}" | DA save -m "$1"; }
flags() { DA flags add "$2" mailbox "$1" uid "$3"; }

build_live() {
    local i
    DA mailbox create Sent Archive Archive/2023 'Entwürfe'
    for i in 1 2 3 4 5 6; do save INBOX "inbox-$i" "Inbox $i" "$i"; done
    save Sent sent-1 "Sent 1" 7
    save Sent sent-2 "Sent 2" 8
    save Archive/2023 big-1 "Big one" 9 60 # ~4 KB: a file of its own
    save 'Entwürfe' draft-1 "Entwurf" 10
    flags INBOX '\Seen' 1:3
    flags INBOX '\Answered' 2
    flags INBOX '$Junk' 3
    flags INBOX '\Flagged $label1' 4
    flags 'Entwürfe' '\Draft' 1
    DA copy Archive mailbox INBOX uid 1 # refcount 2
    flags Archive 'NonJunk' 1
    # Snapshots now (each command must change something to be written): what follows
    # lives only in the transaction logs.
    DA_SNAPSHOT flags add '\Seen' mailbox Sent uid 1
    DA_SNAPSHOT flags add '\Flagged' mailbox INBOX uid 1
    DA_SNAPSHOT copy Archive mailbox INBOX uid 2 # the map index and Archive's
    DA expunge mailbox INBOX uid 2 # still referenced by Archive: refcount 1
    DA expunge mailbox INBOX uid 5 # refcount 0 until purge
    DA expunge mailbox Sent uid 2  # highest uid gone: uidnext stays 3
    DA flags remove '\Seen' mailbox INBOX uid 3
    flags INBOX '$label2' 6
    save INBOX inbox-7 "Inbox 7" 11
    DA mailbox subscribe INBOX Sent Archive
}

# dump NAME: what Dovecot reports about $ROOT, into NAME.fetch / NAME.status (\Recent
# dropped: it depends on which session looked first).
dump() {
    local name=$1
    USER=vmail HOME=$ROOT doveadm -f tab -c "$T/dovecot.conf" -o "mail_location=mdbox:$ROOT" \
        fetch 'mailbox uid guid flags' all | tail -n +2 | sed -E 's/\\Recent ?//; s/ $//' |
        sort -t $'\t' -k1,1 -k2,2n >"$out/$name.fetch"
    USER=vmail HOME=$ROOT doveadm -f tab -c "$T/dovecot.conf" -o "mail_location=mdbox:$ROOT" \
        mailbox status 'messages uidnext uidvalidity guid' '*' | tail -n +2 | sort >"$out/$name.status"
}

# install NAME: copy $ROOT to testdata/mdbox/NAME, owned like the repository, the modes a
# git checkout would have.
install_tree() {
    local name=$1
    rm -rf "${out:?}/$name"
    cp -a "$ROOT" "$out/$name"
    chown -R "$(stat -c %u:%g "$repo")" "$out/$name" "$out/$name".*
    find "$out/$name" -type d -exec chmod 755 {} +
    find "$out/$name" -type f -exec chmod 644 {} +
    find "$out/$name" -mindepth 1 -type d -empty -delete
}

main() {
    check_prerequisites
    T=$(mktemp -d)
    trap 'rm -rf "$T"' EXIT
    chmod 755 "$T"
    write_dovecot_conf "$T"
    mkdir -p "$out"
    ROOT=$T/live
    install -d -o vmail -g vmail -m 700 "$ROOT"
    build_live
    dump live
    install_tree live
    cp -a "$T/live" "$T/purged"
    ROOT=$T/purged
    DA purge
    dump purged
    install_tree purged
    cp -a "$T/live" "$T/resynced"
    ROOT=$T/resynced
    DA force-resync '*' 2>/dev/null # rebuild: writes storage/dovecot.map.index
    save INBOX inbox-8 "Inbox 8" 12
    flags INBOX '\Answered' 8
    dump resynced
    install_tree resynced
    echo "== wrote $out: $(find "$out" -name 'm.*' | wc -l) m.N files"
}

main "$@"

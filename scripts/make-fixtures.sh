#!/usr/bin/env bash
# make-fixtures.sh: rebuilds testdata/sample/Maildir with real Dovecot tools
# (doveadm plus one preauth `imap` session, both standalone: no dovecot service).
# It only ever writes inside a fresh temp dir and testdata/sample/Maildir; it never
# touches src/, the user's mail or any Dovecot service.
#
# Usage (as root, Dovecot 2.3 installed, system user `vmail` present):
#     bash scripts/make-fixtures.sh
#
# As deterministic as Dovecot allows: message texts, Message-IDs, Dates, the order of
# every operation and the hostname inside file names (a private UTS namespace named
# `mdsync-fixture`) are fixed. Not fixed: the time/usec/pid parts of the file names
# (= message GUIDs), the UIDVALIDITYs and the mailbox GUIDs.
set -euo pipefail

readonly FIXTURE_HOSTNAME=mdsync-fixture
readonly IMAP_BIN=/usr/lib/dovecot/imap

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/dovecot-conf.sh
source "$repo/scripts/dovecot-conf.sh"
out=$repo/testdata/sample/Maildir

die() { echo "make-fixtures: $*" >&2; exit 1; }

check_prerequisites() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (doveadm drops to the vmail user)"
    command -v doveadm >/dev/null || die "doveadm not found: apt-get install dovecot-core"
    [[ -x $IMAP_BIN ]] || die "$IMAP_BIN not found: apt-get install dovecot-imapd"
    id vmail >/dev/null 2>&1 || die "system user vmail missing (scripts/test.sh creates it)"
}

# Re-run this script in a private UTS namespace so the maildir file names carry a fixed
# hostname instead of this machine's name.
enter_fixed_hostname() {
    if [[ ${MDSYNC_FIXTURE_UTS:-} != 1 ]]; then
        if unshare --uts true 2>/dev/null; then
            MDSYNC_FIXTURE_UTS=1 exec unshare --uts "$BASH" "${BASH_SOURCE[0]}" "$@"
        fi
        echo "make-fixtures: warning: unshare --uts not permitted; file names will carry '$(hostname)'" >&2
        return
    fi
    hostname "$FIXTURE_HOSTNAME"
}

write_config() {
    write_dovecot_conf "$T"
}

# DA ARGS...: doveadm on the fixture tree as the vmail user.
DA() {
    USER=vmail HOME=$ROOT doveadm -c "$T/dovecot.conf" -o "mail_location=maildir:$ROOT" "$@"
}

# imap_select IMAP_NAME...: one preauth IMAP session that SELECTs each mailbox, which is
# what moves messages from new/ to cur/ (doveadm never does). Names are IMAP (mUTF-7).
imap_select() {
    local cmds="" i=0 name
    for name in "$@"; do
        i=$((i + 1))
        cmds+="s$i SELECT \"$name\""$'\r\n'
    done
    cmds+="z LOGOUT"$'\r\n'
    printf '%s' "$cmds" |
        USER=vmail HOME=$ROOT "$IMAP_BIN" -c "$T/dovecot.conf" -o "mail_location=maildir:$ROOT" \
            >"$T/imap.out" 2>"$T/imap.err" ||
        die "imap SELECT failed: $(cat "$T/imap.err")"
    grep -q '^z OK' "$T/imap.out" || die "imap session did not log out cleanly: $(cat "$T/imap.out")"
    if grep -q '^s[0-9]* NO\|^s[0-9]* BAD' "$T/imap.out"; then
        die "imap SELECT refused: $(grep '^s[0-9]* \(NO\|BAD\)' "$T/imap.out")"
    fi
}

# body_lines TAG COUNT: COUNT deterministic text lines (about 72 bytes each).
body_lines() {
    local tag=$1 count=$2 n
    for ((n = 1; n <= count; n++)); do
        printf '%s line %04d: the quick brown fox jumps over the lazy dog %04d\n' "$tag" "$n" $((n * 7 % 10000))
    done
}

# message ID FROM TO SUBJECT DATE [BODY_LINES]: a complete RFC 5322 message on stdout.
message() {
    local id=$1 from=$2 to=$3 subject=$4 date=$5 lines=${6:-3}
    printf 'Return-Path: <%s>\n' "$from"
    printf 'From: %s\n' "$from"
    printf 'To: %s\n' "$to"
    printf 'Subject: %s\n' "$subject"
    printf 'Date: %s\n' "$date"
    printf 'Message-ID: <%s@fixture.mdsync.test>\n' "$id"
    printf 'MIME-Version: 1.0\n'
    printf 'Content-Type: text/plain; charset=utf-8\n'
    printf 'Content-Transfer-Encoding: 8bit\n'
    printf '\n'
    printf 'Hello,\n\nthis is fixture message %s (%s).\n\n' "$id" "$subject"
    body_lines "$id" "$lines"
    printf '\n-- \nmdsync fixture\n'
}

# save MAILBOX ID SUBJECT DAY [BODY_LINES]: deliver one message with doveadm save.
save() {
    local mailbox=$1 id=$2 subject=$3 day=$4 lines=${5:-3}
    message "$id" "alice@example.org" "bob@example.org" "$subject" \
        "$(printf 'Mon, %02d Jan 2024 %02d:%02d:00 +0100' "$day" $((day % 24)) $((day * 7 % 60)))" \
        "$lines" | DA save -m "$mailbox"
}

flags() { DA flags add "$2" mailbox "$1" uid "$3"; }

build_inbox() {
    local i
    for i in 1 2 3 4 5 6 7 8 9 10; do
        save INBOX "inbox-$i" "Inbox message $i" "$i"
    done
    save INBOX inbox-11 "Inbox large message" 11 90 # ~7 KB
    imap_select INBOX                                # uids 1-11 -> cur/
    flags INBOX '\Seen' 1:5
    flags INBOX '\Answered' 2
    flags INBOX '$Junk' 5 # keyword order differs per folder: INBOX a=$Junk
    flags INBOX '\Flagged $label1' 3
    flags INBOX '$label1 NonJunk' 6
    flags INBOX '\Seen' 11
    DA expunge mailbox INBOX uid 4 # gap in the middle
    save INBOX inbox-12 "Inbox unread 12" 12 # stays in new/
    save INBOX inbox-13 "Inbox unread 13" 13 # stays in new/, flagged below
    flags INBOX '\Flagged' 13              # new/NAME:2,F (doveadm keeps it in new/)
}

build_sent() {
    local i
    DA mailbox create Sent
    for i in 1 2 3 4 5; do
        save Sent "sent-$i" "Sent message $i" $((i + 13))
    done
    imap_select Sent
    flags Sent '\Seen' 1:5
    flags Sent 'NonJunk' 1:2
    flags Sent '$label1' 3
    DA expunge mailbox Sent uid 5 # highest uid gone: uidnext stays 6
}

build_archive() {
    local i
    DA mailbox create Archive
    for i in 1 2 3 4; do
        save Archive "archive-$i" "Archived message $i" $((i + 18))
    done
    imap_select Archive
    flags Archive '\Seen' 1:4
    flags Archive '$label1' 1
    flags Archive '$Junk' 2
    flags Archive 'NonJunk $label1' 3
    flags Archive '\Deleted' 4 # flagged for deletion, never expunged
}

build_archive_2023() {
    DA mailbox create Archive/2023
    save Archive/2023 archive-2023-1 "Archived 2023 message 1" 23
    save Archive/2023 archive-2023-2 "Archived 2023 large message" 24 180 # ~13 KB
    save Archive/2023 archive-2023-3 "Archived 2023 message 3" 25
    imap_select Archive/2023
    flags Archive/2023 '\Seen' 1:3
    flags Archive/2023 '$label2 \Flagged' 2
    flags Archive/2023 '\Answered $label1' 3
}

build_drafts() {
    DA mailbox create 'Entwürfe'
    save 'Entwürfe' draft-1 "Entwurf eins" 26
    imap_select 'Entw&APw-rfe'
    flags 'Entwürfe' '\Draft \Seen' 1
    save 'Entwürfe' draft-2 "Entwurf zwei" 27 # stays in new/ with no flags
}

subscribe_all() {
    DA mailbox subscribe INBOX Sent Archive Archive/2023 'Entwürfe'
}

# Dovecot's index/cache/log files are rebuilt by Dovecot and never copied by mdsync.
strip_indexes() {
    find "$ROOT" -type f \( -name 'dovecot.index*' -o -name 'dovecot.list.index*' \
        -o -name 'dovecot.mailbox.log*' \) -delete
}

# Replace testdata/sample/Maildir with the new tree, owned like the repository, with
# the modes and (no) empty directories a fresh git checkout would have.
install_fixture() {
    rm -rf "$out"
    mkdir -p "$(dirname "$out")"
    cp -a "$ROOT" "$out"
    chown -R "$(stat -c %u:%g "$repo")" "$out"
    find "$out" -type d -exec chmod 755 {} +
    find "$out" -type f -exec chmod 644 {} +
    find "$out" -mindepth 1 -type d -empty -delete
}

main() {
    check_prerequisites
    enter_fixed_hostname "$@"
    T=$(mktemp -d)
    trap 'rm -rf "$T"' EXIT
    chmod 755 "$T"
    ROOT=$T/Maildir
    install -d -o vmail -g vmail -m 700 "$ROOT"
    write_config
    build_inbox
    build_sent
    build_archive
    build_archive_2023
    build_drafts
    subscribe_all
    echo "== what Dovecot sees (before the index files are stripped)"
    DA mailbox status 'messages uidnext uidvalidity guid' '*'
    strip_indexes
    install_fixture
    echo "== wrote $out: $(find "$out" -path '*/cur/*' -o -path '*/new/*' | wc -l) messages"
}

main "$@"

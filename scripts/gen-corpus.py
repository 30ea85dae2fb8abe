#!/usr/bin/env python3
# gen-corpus.py -- generate a realistic, synthetic Dovecot Maildir++ tree for benchmarks.
#
# Usage:
#   gen-corpus.py --messages N --out DIR [--seed S] [--folders F] [--owner USER|none]
#                 [--manifest FILE]
#
# What it makes (deterministic for a given --seed):
#   * INBOX at DIR itself plus Maildir++ folders `.Sent`, `.Archive.2021`, `.Lists.rust`,
#     `.Work.ProjectX.Specs`, `.Entw&APw-rfe` (modified UTF-7), ... (--folders F mailboxes in
#     all, INBOX included; default 26). Each subfolder has an empty `maildirfolder`; every
#     mailbox has cur/ new/ and an empty tmp/.
#   * N messages: RFC 5322 text with LF line ends, unique Message-IDs, random words; sizes
#     mostly 2-30 KiB, ~4% 30-512 KiB, ~0.3% 1-8 MiB (fake base64 attachment).
#   * Dovecot file names `<secs>.M<usec>P<pid>.<host>,S=<size>,W=<size with CRLF>:2,<flags>`
#     in cur/, ~2% of the newest mail in new/ without `:2,`; mtime = received time.
#   * Per mailbox `dovecot-uidlist` (v3 header with distinct uidvalidity, next uid = last
#     uid + 1, mailbox GUID; UID gaps as left by expunges) and `dovecot-keywords` with a
#     letter assignment that differs between mailboxes; in the root `subscriptions`,
#     `dovecot-uidvalidity` and `dovecot-uidvalidity.<hex>`.
#   * --manifest FILE: what Dovecot should report (mailboxes and message uid/guid/flags),
#     for scripts/check-corpus.sh.
#   * --owner: chown the tree at the end (default: `vmail` if that user exists, else no chown).
#
# It never writes outside DIR (and --manifest FILE), refuses a DIR that exists and is not
# empty, and uses only the Python standard library.
import argparse
import base64
import calendar
import os
import pwd
import random
import sys
import time

START = 1451606400  # 2016-01-01 UTC: oldest mail
END = 1748736000    # 2025-06-01 UTC: newest mail
KEYWORDS = ["$Junk", "NonJunk", "$label1", "$label2", "$label3", "$label4", "$label5"]
# IMAP name, weight (share of the mail), kind. Parents come before their children.
CATALOG = [
    ("INBOX", 14, "inbox"), ("Sent", 8, "sent"), ("Drafts", 0.3, "drafts"),
    ("Trash", 2, "trash"), ("Junk", 2, "junk"), ("Archive", 3, "archive"),
    ("Archive/2019", 5, "year"), ("Archive/2020", 5, "year"), ("Archive/2021", 5, "year"),
    ("Archive/2022", 5, "year"), ("Archive/2023", 5, "year"), ("Archive/2024", 5, "year"),
    ("Lists", 0.5, "list"), ("Lists/rust", 6, "list"), ("Lists/dovecot", 4, "list"),
    ("Lists/debian-devel", 5, "list"), ("Lists/lkml", 8, "list"), ("Work", 2, "folder"),
    ("Work/ProjectX", 3, "folder"), ("Work/ProjectX/Specs", 1, "folder"),
    ("Work/ProjectY", 2, "folder"), ("Entwürfe", 0.2, "drafts"), ("Family", 1, "folder"),
    ("Receipts", 1, "folder"), ("Travel", 0.5, "folder"), ("Newsletters", 3, "list"),
]
# Flag strings of messages in cur/ (letters in ASCII order) and their weights.
FLAG_MIX = [("S", 78), ("RS", 8), ("FS", 3), ("FRS", 1), ("", 5), ("ST", 1), ("T", 0.5),
            ("PS", 0.7), ("FPS", 0.3), ("DS", 0.2)]
IMAP_FLAG = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen",
             "T": "\\Deleted"}  # P has no IMAP flag: Dovecot does not report it
COMMON_WORDS = """the of and to in is you that it he was for on are as with his they at be
this have from or one had by word but not what all were we when your can said there use an
each which she do how their if will up other about out many then them these so some her
would make like him into time has look two more write go see number no way could people my
than first water been call who oil its now find long down day did get come made may part
mail server backup mirror sync folder message patch build release kernel driver memory
disk queue index cache thread commit review merge branch test bug fix report meeting
budget invoice travel flight hotel family dinner weekend project draft schedule""".split()
LIVE_KINDS = ("inbox", "list", "junk", "folder")  # mailboxes that still get new mail
HOSTS = [(1530000000, "oldbox"), (1620000000, "mx1"), (END + 1, "mail1.example.org")]


def mutf7(name):
    """IMAP modified UTF-7 of one mailbox name component (RFC 3501 5.1.3)."""
    out, run = [], ""
    for ch in name + "\0":
        if ch != "\0" and not (0x20 <= ord(ch) <= 0x7E):
            run += ch
            continue
        if run:
            b64 = base64.b64encode(run.encode("utf-16-be")).decode().rstrip("=")
            out.append("&" + b64.replace("/", ",") + "-")
            run = ""
        if ch != "\0":
            out.append("&-" if ch == "&" else ch)
    return "".join(out)


def make_pools(rng):
    """Random text (LF lines of words) and base64 lines; bodies are slices of these."""
    syll = ["ka", "to", "ri", "mu", "sen", "lo", "va", "de", "qui", "bra", "ne", "sto"]
    vocab = COMMON_WORDS * 4 + ["".join(rng.choices(syll, k=rng.randint(2, 4)))
                                for _ in range(1500)]
    lines, line = [], []
    width = 0
    for w in rng.choices(vocab, k=400_000):
        if width + len(w) > 72:
            lines.append(" ".join(line))
            line, width = [], 0
            if rng.random() < 0.12:
                lines.append("")  # paragraph break
        line.append(w)
        width += len(w) + 1
    text = ("\n".join(lines) + "\n").encode()
    b64 = base64.encodebytes(rng.randbytes(768 * 1024))  # 76-char lines
    return vocab, text, b64


def take(pool, rng, n):
    """About n bytes of whole lines from pool, starting at a random line."""
    parts, have = [], 0
    while have < n:
        start = pool.find(b"\n", rng.randrange(len(pool) - 1)) + 1
        if start == 0:
            continue
        part = pool[start:start + n - have]
        cut = part.rfind(b"\n") + 1
        if cut == 0:
            break
        parts.append(part[:cut])
        have += cut
    return b"".join(parts)


def pick_size(rng):
    r = rng.random()
    if r < 0.003:
        lo, hi = 1 << 20, 8 << 20
    elif r < 0.043:
        lo, hi = 30 << 10, 512 << 10
    else:
        lo, hi = 2 << 10, 30 << 10
    return int(lo * (hi / lo) ** rng.random())  # log-uniform in [lo, hi)


def rfc2822_date(t, tz_min):
    tm = time.gmtime(t + tz_min * 60)
    sign = "+" if tz_min >= 0 else "-"
    return "%s, %02d %s %d %02d:%02d:%02d %s%02d%02d" % (
        ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[tm.tm_wday], tm.tm_mday,
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
         "Dec")[tm.tm_mon - 1], tm.tm_year, tm.tm_hour, tm.tm_min, tm.tm_sec, sign,
        abs(tz_min) // 60, abs(tz_min) % 60)


def make_message(rng, pools, t, msgid, kind, listname, size):
    """Bytes of one RFC 5322 message (LF line ends) of roughly `size` bytes."""
    vocab, text, b64 = pools
    people = vocab[-1500:]  # the invented words
    sender = "%s.%s@%s.example" % (rng.choice(people), rng.choice(people), rng.choice(people))
    me = "user@example.org"
    frm, to = (me, sender) if kind in ("sent", "drafts") else (sender, me)
    subject = " ".join(rng.choices(vocab, k=rng.randint(3, 9))).capitalize()
    date = rfc2822_date(t - rng.randint(5, 600), rng.choice((0, 60, 120, -300, -480, 330)))
    hdr = ["Return-Path: <%s>" % frm, "Delivered-To: %s" % me,
           "Received: from mx.%s (mx.%s [198.51.100.%d])" % (sender.split("@")[1],
                                                           sender.split("@")[1],
                                                           rng.randint(1, 254)),
           "\tby mail.example.org (Postfix) with ESMTPS id %010X" % rng.getrandbits(40),
           "\tfor <%s>; %s" % (me, rfc2822_date(t, 0)),
           "Message-ID: <%s>" % msgid, "Date: %s" % date, "From: %s" % frm, "To: %s" % to,
           "Subject: %s" % subject]
    if listname:
        hdr += ["List-Id: <%s.lists.example.net>" % listname,
                "List-Unsubscribe: <mailto:%s-leave@lists.example.net>" % listname,
                "Precedence: list"]
    if rng.random() < 0.3:
        hdr.append("In-Reply-To: <%d.%x@%s>" % (t - rng.randint(60, 900_000),
                                               rng.getrandbits(32), sender.split("@")[1]))
    hdr.append("MIME-Version: 1.0")
    head = ("\n".join(hdr) + "\n").encode()
    want = max(200, size - len(head) - 80)
    if want < 64 << 10:
        return head + b"Content-Type: text/plain; charset=utf-8\n" \
            b"Content-Transfer-Encoding: 8bit\n\n" + take(text, rng, want)
    boundary = "=_%016x" % rng.getrandbits(64)
    intro = take(text, rng, rng.randint(500, 4000))
    return b"".join([
        head, b'Content-Type: multipart/mixed; boundary="%s"\n\n' % boundary.encode(),
        b"--%s\nContent-Type: text/plain; charset=utf-8\n\n" % boundary.encode(), intro,
        b"\n--%s\nContent-Type: application/octet-stream; name=\"file%d.bin\"\n"
        b"Content-Transfer-Encoding: base64\n\n" % (boundary.encode(), rng.randint(1, 999)),
        take(b64, rng, want - len(intro)), b"\n--%s--\n" % boundary.encode()])


def flag_string(letters, keyword_letters):
    return "".join(sorted(letters)) + "".join(sorted(keyword_letters))


def imap_flags(letters, kwmap):
    """Flags as doveadm prints them, sorted: system flags then keyword names."""
    names = [IMAP_FLAG[c] for c in letters if c in IMAP_FLAG]
    names += [kwmap[c] for c in letters if c in kwmap]
    return " ".join(sorted(names))


def write_file(path, data, mtime=None, mode=0o600):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


def plan_mailboxes(rng, nfolders):
    boxes = list(CATALOG[:nfolders])
    for i in range(len(boxes), nfolders):
        if i == len(CATALOG):
            boxes.append(("Projects", 0.5, "folder"))
        else:
            boxes.append(("Projects/P%03d" % (i - len(CATALOG)), 0.5, "folder"))
    uidvalidity = START - 86400 * 30 + rng.randint(0, 86400)
    out = []
    for name, weight, kind in boxes:
        uidvalidity += rng.randint(1, 50_000)  # Dovecot hands out growing values
        disk = "" if name == "INBOX" else "." + ".".join(mutf7(p) for p in name.split("/"))
        if kind == "junk":
            kws = ["$Junk", "NonJunk"]
        elif kind == "inbox":
            kws = list(KEYWORDS)
        else:
            kws = rng.sample(KEYWORDS, rng.randint(0, len(KEYWORDS)))
        rng.shuffle(kws)
        slots = sorted(rng.sample(range(len(kws) + 2), len(kws)))  # gaps in the indexes
        kwmap = {chr(ord("a") + i): k for i, k in zip(slots, kws)}
        out.append(dict(name=name, weight=weight, kind=kind, disk=disk,
                        uidvalidity=uidvalidity, guid="%032x" % rng.getrandbits(128),
                        kwmap=kwmap, times=[]))
    return out


def main():
    ap = argparse.ArgumentParser(description="Generate a synthetic Dovecot Maildir++ tree.")
    ap.add_argument("--messages", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--folders", type=int, default=len(CATALOG),
                    help="number of mailboxes including INBOX (default %(default)s)")
    ap.add_argument("--owner", default=None,
                    help="user to chown the tree to, or 'none' (default: vmail if it exists)")
    ap.add_argument("--manifest", help="write what Dovecot should report to this file")
    args = ap.parse_args()
    if args.folders < 1:
        ap.error("--folders must be >= 1")
    owner = args.owner
    if owner is None:
        try:
            pwd.getpwnam("vmail")
            owner = "vmail"
        except KeyError:
            owner = "none"
    uid = gid = None
    if owner != "none":
        pw = pwd.getpwnam(owner)
        uid, gid = pw.pw_uid, pw.pw_gid
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit("gen-corpus: %s exists and is not empty" % args.out)

    started = time.time()
    rng = random.Random(args.seed)
    pools = make_pools(rng)
    boxes = plan_mailboxes(rng, args.folders)

    # Received times: archive years hold their year, the rest leans to recent mail.
    for box in rng.choices(boxes, [b["weight"] for b in boxes], k=args.messages):
        if box["kind"] == "year":
            y0 = calendar.timegm((int(box["name"][-4:]), 1, 1, 0, 0, 0))
            t = y0 + rng.random() * 365 * 86400
        else:
            t = START + (END - START) * rng.random() ** 0.7
        box["times"].append(t)
    live = [b for b in boxes if b["kind"] in LIVE_KINDS]
    live_total = sum(len(b["times"]) for b in live) or 1
    new_share = 0.02 * args.messages / live_total

    os.makedirs(args.out, mode=0o700, exist_ok=True)
    os.chmod(args.out, 0o700)
    manifest = []
    people = pools[0][-1500:]
    seq = 0
    total_bytes = 0
    for box in boxes:
        mdir = os.path.join(args.out, box["disk"])
        for sub in ("", "cur", "new", "tmp"):
            os.makedirs(os.path.join(mdir, sub), mode=0o700, exist_ok=True)
        if box["disk"]:
            write_file(os.path.join(mdir, "maildirfolder"), b"")
        times = sorted(box["times"])
        n_new = round(len(times) * new_share) if box["kind"] in LIVE_KINDS else 0
        kwmap = box["kwmap"]
        letters_of = {v: k for k, v in kwmap.items()}
        labels = sorted(k for k, v in kwmap.items() if v.startswith("$label"))
        listname = box["name"].split("/")[-1] if box["kind"] == "list" else None
        uid_ = rng.choice((1, 1, 1, rng.randint(2, 300)))
        uidlist = ["3 V%d N%%d G%s\n" % (box["uidvalidity"], box["guid"])]
        names = set()
        manifest.append((box, uidlist, []))
        for i, t in enumerate(times):
            seq += 1
            secs = int(t)
            host = next(h for until, h in HOSTS if secs < until)
            msgid = "%d.%x.%08x@%s" % (secs, seq, rng.getrandbits(32),
                                       "mail.example.org" if box["kind"] == "sent"
                                       else "%s.example" % rng.choice(people))
            data = make_message(rng, pools, secs, msgid, box["kind"], listname,
                                pick_size(rng))
            base = "%d.M%dP%d.%s,S=%d,W=%d" % (secs, rng.randrange(1_000_000),
                                               rng.randint(300, 65_000), host, len(data),
                                               len(data) + data.count(b"\n"))
            while base in names:  # practically never
                base = base.replace(".M", ".M1", 1)
            names.add(base)
            if i >= len(times) - n_new:
                path = os.path.join(mdir, "new", base)
                letters = ""
            else:
                letters = rng.choices([f for f, _ in FLAG_MIX], [w for _, w in FLAG_MIX])[0]
                if box["kind"] == "drafts":
                    letters = rng.choice(("DS", "D"))
                elif box["kind"] == "sent":
                    letters = rng.choice(("S", "S", "S", "RS"))
                elif box["kind"] == "junk":
                    letters = rng.choice(("", "S", "S"))
                kw = []
                if box["kind"] == "junk" and rng.random() < 0.9:
                    kw.append(letters_of["$Junk"])
                if "NonJunk" in letters_of and box["kind"] != "junk" and rng.random() < 0.1:
                    kw.append(letters_of["NonJunk"])
                if labels and rng.random() < 0.12:
                    kw += rng.sample(labels, min(len(labels), rng.randint(1, 2)))
                letters = flag_string(letters, kw)
                path = os.path.join(mdir, "cur", base + ":2," + letters)
            write_file(path, data, t)
            total_bytes += len(data)
            uidlist.append("%d :%s\n" % (uid_, base))
            manifest[-1][2].append((uid_, base, imap_flags(letters, kwmap)))
            uid_ += 1 if rng.random() > 0.03 else rng.randint(2, 20)  # expunged UIDs
        last_uid = int(uidlist[-1].split()[0]) if len(uidlist) > 1 else 0
        box["uidnext"] = last_uid + 1
        uidlist[0] = uidlist[0] % box["uidnext"]
        write_file(os.path.join(mdir, "dovecot-uidlist"), "".join(uidlist).encode())
        if kwmap:
            write_file(os.path.join(mdir, "dovecot-keywords"), "".join(
                "%d %s\n" % (ord(k) - ord("a"), v) for k, v in sorted(kwmap.items())).encode())

    last_validity = max(b["uidvalidity"] for b in boxes)
    write_file(os.path.join(args.out, "dovecot-uidvalidity"), b"%08x" % last_validity)
    write_file(os.path.join(args.out, "dovecot-uidvalidity.%08x" % last_validity), b"", None,
               0o444)
    subscribed = [b for b in boxes if b["kind"] not in ("junk", "trash") or rng.random() < 0.5]
    write_file(os.path.join(args.out, "subscriptions"), ("V\t2\n\n" + "".join(
        "\t".join(mutf7(p) for p in b["name"].split("/")) + "\n" for b in subscribed)).encode())

    if args.manifest:
        with open(args.manifest, "w") as f:
            for box, _, msgs in manifest:
                f.write("mailbox\t%s\t%d\t%d\t%d\t%s\n" % (box["name"], len(msgs),
                                                          box["uidnext"], box["uidvalidity"],
                                                          box["guid"]))
                for uid_, base, flags in msgs:
                    f.write("mail\t%s\t%d\t%s\t%s\n" % (box["name"], uid_, base, flags))

    if uid is not None:
        for dirpath, dirnames, filenames in os.walk(args.out):
            os.chown(dirpath, uid, gid)
            for name in filenames:
                os.chown(os.path.join(dirpath, name), uid, gid)

    print("gen-corpus: %d messages, %d mailboxes, %.1f MiB in %.1f s -> %s" % (
        args.messages, len(boxes), total_bytes / 2**20, time.time() - started, args.out))


if __name__ == "__main__":
    main()

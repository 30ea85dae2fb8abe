#!/usr/bin/env python3
# mutate-corpus.py -- change a Maildir++ tree the way a live Dovecot server would, directly on disk.
#
# Usage:
#   mutate-corpus.py DIR [--flags P] [--new P] [--expunge P] [--seed S]
#     --flags P    change the flags of P % of the messages (default 1)
#     --new P      deliver P % new messages (default 0.5)
#     --expunge P  expunge P % of the messages (default 0.2)
#
# What it does (deterministic for a given tree and --seed):
#   * flag changes: rename the file inside cur/ keeping its base name (toggle \Seen, add
#     \Answered, toggle \Flagged or \Deleted, toggle a keyword letter from the mailbox's
#     dovecot-keywords); a file in new/ moves to cur/ with a `:2,<flags>` suffix;
#   * new messages (made like gen-corpus.py's, newer than any mail in the tree): written to
#     tmp/, then renamed into new/ (or cur/ with `:2,S`); the mailbox's dovecot-uidlist gets
#     records with new UIDs and a bumped `N` header by a rewrite to dovecot-uidlist.tmp plus
#     rename, which (like Dovecot's rewrite) drops the records of files that are gone;
#   * expunges: unlink the file; in mailboxes that get no new mail the uidlist record lingers
#     (as after Dovecot's append-only updates).
#   Flag changes and expunges hit distinct messages. New mail goes to the mailboxes that
#   received mail in the tree's last year, in proportion. New files get the owner of their
#   mailbox directory. Prints one summary line.
#
# It never touches anything outside DIR, never modifies the bytes of an existing message, and
# takes no Dovecot locks: do not run it on a tree a running Dovecot is using.
import argparse
import importlib.util
import os
import random
import sys

sys.dont_write_bytecode = True  # do not leave a __pycache__ next to the scripts
HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("gen_corpus", os.path.join(HERE, "gen-corpus.py"))
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


def mailboxes(root):
    """Maildir++ mailbox directories under root: root itself (INBOX) and `.Name` dirs."""
    out = [root] if os.path.isdir(os.path.join(root, "cur")) else []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".") and name not in (".", "..") and \
                os.path.isdir(os.path.join(path, "cur")):
            out.append(path)
    return out


def read_keywords(mdir):
    try:
        with open(os.path.join(mdir, "dovecot-keywords")) as f:
            return sorted(chr(ord("a") + int(line.split()[0])) for line in f
                          if line.split() and line.split()[0].isdigit())
    except FileNotFoundError:
        return []


def split_name(name):
    """(base, flags) of a Maildir file name; flags '' when there is no `:2,` info."""
    base, _, info = name.partition(":")
    return base, info[2:] if info.startswith("2,") else ""


def with_flag(flags, letter, on):
    letters = set(flags) | {letter} if on else set(flags) - {letter}
    return "".join(sorted(c for c in letters if not c.islower())) + \
        "".join(sorted(c for c in letters if c.islower()))


def new_flags(rng, flags, keyword_letters):
    r = rng.random()
    if r < 0.45:
        return with_flag(flags, "S", "S" not in flags)
    if r < 0.60:
        return with_flag(with_flag(flags, "S", True), "R", True) if "R" not in flags \
            else with_flag(flags, "R", False)
    if r < 0.75 or not keyword_letters:
        return with_flag(flags, "F", "F" not in flags)
    if r < 0.80:
        return with_flag(flags, "T", "T" not in flags)
    letter = rng.choice(keyword_letters)
    return with_flag(flags, letter, letter not in flags)


def rewrite_uidlist(mdir, appended, alive, owner):
    """Append `appended` [(base)] with new UIDs, bump N, drop records of gone files."""
    path = os.path.join(mdir, "dovecot-uidlist")
    with open(path) as f:
        header, *records = f.read().splitlines()
    fields = header.split()
    next_uid = int(next(x[1:] for x in fields[1:] if x.startswith("N")))
    last_uid = int(records[-1].split()[0]) if records else 0
    uid = max(next_uid, last_uid + 1)
    kept = [r for r in records if r.split(" :", 1)[-1].split(":")[0] in alive]
    for base in appended:
        kept.append("%d :%s" % (uid, base))
        uid += 1
    fields = [fields[0]] + [("N%d" % uid) if x.startswith("N") else x for x in fields[1:]]
    tmp = path + ".tmp"
    gen.write_file(tmp, ("\n".join([" ".join(fields)] + kept) + "\n").encode())
    os.chown(tmp, *owner)
    os.rename(tmp, path)


def main():
    ap = argparse.ArgumentParser(description="Mutate a Maildir++ tree like a live server.")
    ap.add_argument("dir")
    ap.add_argument("--flags", type=float, default=1.0, help="percent of messages")
    ap.add_argument("--new", type=float, default=0.5, help="percent of messages")
    ap.add_argument("--expunge", type=float, default=0.2, help="percent of messages")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    boxes = mailboxes(args.dir)
    msgs = []  # (mailbox dir, "cur"/"new", file name)
    for mdir in boxes:
        for sub in ("cur", "new"):
            msgs += [(mdir, sub, n) for n in sorted(os.listdir(os.path.join(mdir, sub)))
                     if not n.startswith(".")]
    total = len(msgs)
    n_flags = round(total * args.flags / 100)
    n_exp = round(total * args.expunge / 100)
    n_new = round(total * args.new / 100)
    if n_flags + n_exp > total:
        raise SystemExit("mutate-corpus: more flag changes and expunges than messages")
    picked = rng.sample(range(total), n_flags + n_exp)

    keywords = {mdir: read_keywords(mdir) for mdir in boxes}
    for i in picked[:n_flags]:
        mdir, sub, name = msgs[i]
        base, flags = split_name(name)
        if sub == "new":
            target = base + ":2," + with_flag(flags, "S", True)  # a client read it
        else:
            target = base + ":2," + new_flags(rng, flags, keywords[mdir])
        os.rename(os.path.join(mdir, sub, name), os.path.join(mdir, "cur", target))
    exp_bytes = 0
    for i in picked[n_flags:]:
        mdir, sub, name = msgs[i]
        path = os.path.join(mdir, sub, name)
        exp_bytes += os.path.getsize(path)
        os.unlink(path)

    # New mail: newer than anything in the tree, into mailboxes that got mail in the last year.
    secs = {m: int(m[2].split(".", 1)[0]) for m in msgs if m[2].split(".", 1)[0].isdigit()}
    newest = max(secs.values(), default=int(gen.END))
    newest_msg = max(secs, key=secs.get) if secs else None
    host = newest_msg[2].split(".", 2)[2].split(",")[0].split(":")[0] if newest_msg \
        else "localhost"
    recent = {}
    for (mdir, _, _), t in secs.items():
        if t > newest - 365 * 86400:
            recent[mdir] = recent.get(mdir, 0) + 1
    targets = sorted(recent) or boxes
    weights = [recent.get(m, 1) for m in targets]
    taken = {split_name(m[2])[0] for m in msgs}
    pools = gen.make_pools(rng) if n_new else None
    appended = {}
    new_bytes = 0
    t = newest
    for seq in range(n_new):
        mdir = rng.choices(targets, weights)[0]
        t += rng.randint(5, 900)
        msgid = "%d.%x.%08x@new.example" % (t, seq, rng.getrandbits(32))
        data = gen.make_message(rng, pools, t, msgid, "inbox", None, gen.pick_size(rng))
        base = "%d.M%dP%d.%s,S=%d,W=%d" % (t, rng.randrange(1_000_000), rng.randint(300, 65_000),
                                           host, len(data), len(data) + data.count(b"\n"))
        if base in taken:
            continue
        taken.add(base)
        st = os.stat(mdir)
        tmp = os.path.join(mdir, "tmp", base)
        gen.write_file(tmp, data, t)
        os.chown(tmp, st.st_uid, st.st_gid)
        if rng.random() < 0.8:
            os.rename(tmp, os.path.join(mdir, "new", base))
        else:
            os.rename(tmp, os.path.join(mdir, "cur", base + ":2,S"))
        appended.setdefault(mdir, []).append(base)
        new_bytes += len(data)

    rewritten = 0
    for mdir, bases in sorted(appended.items()):
        if os.path.exists(os.path.join(mdir, "dovecot-uidlist")):
            rewritten += 1
            alive = {split_name(n)[0] for sub in ("cur", "new")
                     for n in os.listdir(os.path.join(mdir, sub))}
            st = os.stat(mdir)
            rewrite_uidlist(mdir, bases, alive, (st.st_uid, st.st_gid))

    print("mutate-corpus: %d messages: %d flag changes, %d new (%d bytes), "
          "%d expunged (%d bytes), %d uidlists rewritten" % (
              total, n_flags, sum(map(len, appended.values())), new_bytes, n_exp, exp_bytes,
              rewritten))


if __name__ == "__main__":
    main()

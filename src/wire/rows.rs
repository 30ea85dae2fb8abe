//! Row deltas: a mailbox table encoding (`wire::table`) described as the rows of a baseline
//! both sides hold, kept, skipped or replaced by literal rows, in order. Cheap on both ends
//! (no dictionary to load, one pass over the rows) and as small as the rows that changed.
//! Pure functions over bytes; never decodes a row's contents, only its length, and never
//! trusts a count the peer sends.

use std::ops::Range;

use super::conn::WireError;
use super::frame::Payload;
use super::path::MAX_PATH;

/// Copy the next `n` rows of the baseline.
const COPY: u8 = 0;
/// Skip the next `n` rows of the baseline.
const SKIP: u8 = 1;
/// `n` rows follow, in the table encoding's row format.
const LITERAL: u8 = 2;

/// An encoding cut into its head (length and JSON), its rows, and what follows them.
struct Cut {
    head: Range<usize>,
    rows: Vec<Range<usize>>,
    tail: Range<usize>,
}

fn bad(why: &str) -> WireError {
    WireError::protocol(format!("malformed table row delta: {why}"))
}

/// Walks past one row of a table encoding (see `wire::table::encode`) without looking
/// at its contents.
fn skip_row(p: &mut Payload<'_>) -> Option<()> {
    p.take(4 + 1 + 4 + 4 + 4)?; // uid, status, system flags, keywords, size
    let name = p.u16()? as usize;
    p.take(name)?;
    p.take(2)?; // base length
    let tag = p.u8()?;
    for present in [tag & 1 != 0 && tag & 2 != 0, tag & 1 != 0 && tag & 4 != 0] {
        if present {
            p.string(MAX_PATH)?;
        }
    }
    Some(())
}

/// Cuts an encoding into head, rows and tail; `None` when it is not one.
fn cut(bytes: &[u8]) -> Option<Cut> {
    let mut p = Payload::new(bytes);
    let at = |p: &Payload<'_>| bytes.len() - p.left();
    let head_len = p.u32()? as usize;
    p.take(head_len)?;
    let head = 0..at(&p);
    let count = p.u32()? as usize;
    // A row takes at least 22 bytes: the count cannot make us allocate more.
    if count > bytes.len() / 22 {
        return None;
    }
    let mut rows = Vec::with_capacity(count);
    for _ in 0..count {
        let start = at(&p);
        skip_row(&mut p)?;
        rows.push(start..at(&p));
    }
    Some(Cut {
        head,
        rows,
        tail: at(&p)..bytes.len(),
    })
}

fn uid(bytes: &[u8], row: &Range<usize>) -> u32 {
    u32::from_le_bytes(
        bytes[row.start..row.start + 4]
            .try_into()
            .expect("a row has a uid"),
    )
}

/// Ops as they are made, runs of the same kind merged.
struct Ops<'a> {
    out: Vec<u8>,
    encoding: &'a [u8],
    run: Option<(u8, u32, usize)>,
}

impl Ops<'_> {
    /// One more row of kind `op`; `row` is where a literal one lies in the encoding.
    fn push(&mut self, op: u8, row: &Range<usize>) {
        match &mut self.run {
            Some((kind, n, _)) if *kind == op && *n < u32::MAX => *n += 1,
            _ => {
                self.flush(row.start);
                self.run = Some((op, 1, row.start));
            }
        }
    }

    /// Writes the run in progress; a literal run's rows end at `end`.
    fn flush(&mut self, end: usize) {
        if let Some((op, n, start)) = self.run.take() {
            self.out.push(op);
            self.out.extend_from_slice(&n.to_le_bytes());
            if op == LITERAL {
                self.out.extend_from_slice(&self.encoding[start..end]);
            }
        }
    }
}

/// The row delta that rebuilds `encoding` from `baseline`, when both are table encodings
/// and at most half of the rows changed. Rows are matched in order by UID and bytes: a row
/// equal to the baseline's next one is copied, any other is sent whole. Past half, a
/// zstd delta (which finds the unchanged bytes inside changed rows: "mark all as read")
/// is the better choice.
pub fn make(encoding: &[u8], baseline: &[u8]) -> Option<Vec<u8>> {
    let (new, old) = (cut(encoding)?, cut(baseline)?);
    let mut ops = Ops {
        out: Vec::with_capacity(new.head.len() + 1024),
        encoding,
        run: None,
    };
    ops.out.extend_from_slice(&encoding[new.head.clone()]);
    ops.out
        .extend_from_slice(&(new.rows.len() as u32).to_le_bytes());
    let (mut i, mut literal) = (0, 0);
    for row in &new.rows {
        // Baseline rows before this one's UID are gone (or renumbered): skipped.
        while let Some(was) = old.rows.get(i)
            && baseline[was.clone()] != encoding[row.clone()]
            && uid(baseline, was) <= uid(encoding, row)
        {
            let same_uid = uid(baseline, was) == uid(encoding, row);
            ops.push(SKIP, row);
            i += 1;
            if same_uid {
                break;
            }
        }
        match old.rows.get(i) {
            Some(was) if baseline[was.clone()] == encoding[row.clone()] => {
                ops.push(COPY, row);
                i += 1;
            }
            _ => {
                ops.push(LITERAL, row);
                literal += 1;
            }
        }
    }
    if literal * 2 > new.rows.len() {
        return None;
    }
    ops.flush(new.tail.start);
    ops.out.extend_from_slice(&encoding[new.tail.clone()]);
    (ops.out.len() < encoding.len()).then_some(ops.out)
}

/// Rebuilds an encoding from a row delta and the baseline it was made against. Every
/// count is checked against what the baseline and the delta hold, so the result is never
/// larger than the two together; the caller checks the result's identity.
pub fn apply(delta: &[u8], baseline: &[u8]) -> Result<Vec<u8>, WireError> {
    let old = cut(baseline).ok_or_else(|| bad("the baseline is not a table"))?;
    let mut p = Payload::new(delta);
    let head_len = p.u32().ok_or_else(|| bad("no head"))?;
    let head = p.take(head_len as usize).ok_or_else(|| bad("short head"))?;
    let count = p.u32().ok_or_else(|| bad("no row count"))? as usize;
    let mut out = Vec::with_capacity(baseline.len().saturating_add(delta.len()));
    out.extend_from_slice(&head_len.to_le_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    let (mut made, mut i) = (0usize, 0usize);
    while made < count {
        let op = p.u8().ok_or_else(|| bad("short op"))?;
        let n = p.u32().ok_or_else(|| bad("short op"))? as usize;
        if n == 0 {
            return Err(bad("an empty op"));
        }
        match op {
            COPY | SKIP if n > old.rows.len() - i => return Err(bad("past the baseline")),
            COPY | LITERAL if n > count - made => return Err(bad("more rows than counted")),
            COPY => {
                let rows = old.rows[i].start..old.rows[i + n - 1].end;
                out.extend_from_slice(&baseline[rows]);
                (i, made) = (i + n, made + n);
            }
            SKIP => i += n,
            LITERAL => {
                let before = p.left();
                let mut rows = Payload::new(&delta[delta.len() - before..]);
                for _ in 0..n {
                    skip_row(&mut rows).ok_or_else(|| bad("a short literal row"))?;
                }
                let taken = before - rows.left();
                out.extend_from_slice(p.take(taken).expect("walked above"));
                made += n;
            }
            _ => return Err(bad("an unknown op")),
        }
    }
    out.extend_from_slice(p.rest());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Flags;
    use crate::table::{Extras, MailboxTable};
    use crate::wire::table::encode;

    /// A mailbox of `uids`, message 7 with `flag_of_7`, message 3 with a GUID.
    fn table(uids: impl Iterator<Item = u32>, flag_of_7: u32) -> MailboxTable {
        let mut t = MailboxTable {
            dir: ".A".into(),
            name: "A".into(),
            next_uid: 5000,
            ..MailboxTable::default()
        };
        for uid in uids {
            let base = format!("17000{uid:05}.M{uid}P1.host,S=1234");
            let extras = (uid == 3).then(|| Extras {
                guid: Some(t.intern("guid-three")),
                ext: Some(t.intern("X1")),
            });
            let system = if uid == 7 { flag_of_7 } else { 1 << 18 };
            let flags = Flags {
                system,
                keywords: uid % 3,
            };
            t.push(
                uid,
                &format!("{base}:2,S"),
                base.len(),
                flags,
                1234,
                extras,
                0,
            );
        }
        let gone = t.intern("gone.M1");
        t.listed_missing.push((4999, gone));
        t
    }

    fn round_trip(before: &MailboxTable, after: &MailboxTable) -> usize {
        let (base, want) = (encode(before), encode(after));
        let delta = make(&want, &base).expect("smaller than the table");
        assert_eq!(apply(&delta, &base).unwrap(), want);
        delta.len()
    }

    #[test]
    fn changed_new_and_gone_rows_round_trip_in_few_bytes() {
        let before = table(1..=2000, 1 << 18);
        let flag = table(1..=2000, 1 << 5);
        // The head travels whole (its stamps change with every write to the mailbox).
        let head = 4 + u32::from_le_bytes(encode(&flag)[..4].try_into().unwrap()) as usize;
        let one_row = 22 + "1700000007.M7P1.host,S=1234:2,S".len();
        let ops = 5 * 4; // copy 1–6, skip the old 7, the new 7, copy the rest
        let tail = 4 + 4 + 2 + "gone.M1".len();
        assert_eq!(round_trip(&before, &flag), head + 4 + ops + one_row + tail);
        // Expunges, new mail and a flag change at once: a few bytes per change.
        let after = table((1..=2000).filter(|u| u % 97 != 0).chain(2001..2011), 1 << 5);
        assert!(round_trip(&before, &after) < head + 11 * one_row + 60 * 5);
        // A table with most rows changed is left to a zstd delta.
        let other = table(3001..=4000, 1 << 18);
        assert!(make(&encode(&other), &encode(&before)).is_none());
        let mut half = table(1..=2000, 1 << 18);
        for row in (0..2000).step_by(2) {
            half.msgs.flags[row].system |= 1 << 3;
        }
        assert!(make(&encode(&half), &encode(&before)).is_some());
        half.msgs.flags[1].system |= 1 << 3;
        assert!(make(&encode(&half), &encode(&before)).is_none());
    }

    #[test]
    fn a_delta_lying_about_its_rows_is_refused() {
        let base = encode(&table(1..=50, 1 << 18));
        let want = encode(&table(1..=50, 1 << 5));
        let delta = make(&want, &base).unwrap();
        let head = u32::from_le_bytes(delta[..4].try_into().unwrap()) as usize;
        let count_at = 4 + head;
        for count in [0u32, 49, 51, u32::MAX] {
            let mut lying = delta.clone();
            lying[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
            let rebuilt = apply(&lying, &base);
            assert!(
                rebuilt.is_err() || rebuilt.unwrap() != want,
                "count {count}"
            );
        }
        // Copies past the end of the baseline, or an empty op.
        for n in [0u32, 51, u32::MAX] {
            let mut op = delta[..count_at + 4].to_vec();
            op.push(COPY);
            op.extend_from_slice(&n.to_le_bytes());
            assert!(apply(&op, &base).is_err(), "copy {n}");
        }
        assert!(apply(&delta, b"not a table").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_two_tables_round_trip(
            old in proptest::collection::btree_set(1u32..300, 0..120),
            new in proptest::collection::btree_set(1u32..300, 0..120),
            flag in 0u32..4,
        ) {
            let before = table(old.into_iter(), 1 << 18);
            let after = table(new.into_iter(), 1 << flag);
            let (base, want) = (encode(&before), encode(&after));
            if let Some(delta) = make(&want, &base) {
                proptest::prop_assert_eq!(apply(&delta, &base).unwrap(), want);
            }
        }

        /// Random ops after a well-formed head and row count, and random bytes.
        #[test]
        fn random_deltas_never_panic(
            ops in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            count in 0u32..40,
        ) {
            let base = encode(&table(1..=20, 1 << 18));
            let head = 4 + u32::from_le_bytes(base[..4].try_into().unwrap()) as usize;
            let mut delta = base[..head].to_vec();
            delta.extend_from_slice(&count.to_le_bytes());
            delta.extend_from_slice(&ops);
            let _ = apply(&delta, &base);
            let _ = apply(&ops, &base);
        }
    }
}

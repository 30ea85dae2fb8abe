//! `dovecot-uidlist`: parse the v3 (and Courier v1) text into borrowed records and render a
//! new file. Pure text work: reading, locking and writing the file live in the scanner and
//! the writer.

use crate::model::MailboxGuid;

/// The uidlist file name inside a mailbox directory.
pub const FILE_NAME: &str = "dovecot-uidlist";

/// Header fields. `next_uid` is the raw `N`, which may be stale: use [`Uidlist::next_uid`].
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Header {
    /// `V`: UIDVALIDITY, non-zero.
    pub uid_validity: u32,
    /// `N` as written (may be lower than the last record + 1).
    pub next_uid: u32,
    /// `G`: the mailbox GUID, absent in files older than Dovecot 2.0.
    pub guid: Option<MailboxGuid>,
    /// Any other header fields (`P…`, unknown keys), kept verbatim and space-separated.
    pub extra: String,
}

/// One record, borrowing from the file text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// The UID, never 0.
    pub uid: u32,
    /// `G` field: the message GUID when it differs from the base name.
    pub guid: Option<&'a str>,
    /// Other extension fields (`S W P O …`) in their order, space-separated; empty when
    /// none. Borrowed unless a `G` field sat between them.
    pub ext: std::borrow::Cow<'a, str>,
    /// Base file name (anything after a `:` in old files is cut off).
    pub base: &'a str,
}

/// A parsed uidlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uidlist<'a> {
    /// The header line.
    pub header: Header,
    /// Records sorted by UID, UIDs unique.
    pub records: Vec<Record<'a>>,
}

/// Why a uidlist cannot be trusted. Carries the 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidlistError {
    /// Unknown version digit or malformed header.
    #[error("line 1: bad header: {0}")]
    BadHeader(String),
    /// A record line that does not parse.
    #[error("line {line}: bad record: {reason}")]
    BadRecord {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The same UID twice: Dovecot would renumber, so we refuse to guess.
    #[error("line {line}: duplicate uid {uid}")]
    DuplicateUid {
        /// 1-based line number.
        line: usize,
        /// The repeated UID.
        uid: u32,
    },
    /// A torn last line (no newline): a writer died mid-append.
    #[error("line {0}: truncated (no final newline)")]
    Truncated(usize),
}

impl Uidlist<'_> {
    /// The next UID Dovecot would assign: `max(N, last record + 1)`.
    pub fn next_uid(&self) -> u32 {
        let after_last = self.records.last().map_or(1, |r| r.uid.saturating_add(1));
        self.header.next_uid.max(after_last).max(1)
    }
}

/// Parses a whole uidlist file.
pub fn parse(text: &str) -> Result<Uidlist<'_>, UidlistError> {
    if text.is_empty() {
        return Err(UidlistError::BadHeader("empty file".into()));
    }
    let mut lines = text.split_inclusive('\n').enumerate();
    let (_, first) = lines.next().unwrap_or((0, ""));
    let first = complete_line(first, 1)?;
    let (version, header) = parse_header(first)?;
    // About one record per 50 bytes of a Dovecot uidlist.
    let mut records = Vec::with_capacity(text.len() / 50 + 1);
    let mut sorted = true;
    for (index, raw) in lines {
        let line_no = index + 1;
        let line = complete_line(raw, line_no)?;
        if line.is_empty() {
            continue;
        }
        let record = if version == 1 {
            parse_v1_record(line, line_no)?
        } else {
            parse_v3_record(line, line_no)?
        };
        if let Some(prev) = records.last().map(|r: &Record<'_>| r.uid) {
            if record.uid == prev {
                return Err(UidlistError::DuplicateUid {
                    line: line_no,
                    uid: record.uid,
                });
            }
            sorted &= record.uid > prev;
        }
        records.push(record);
    }
    if !sorted {
        records.sort_by_key(|r| r.uid);
        if let Some(w) = records.windows(2).find(|w| w[0].uid == w[1].uid) {
            return Err(UidlistError::DuplicateUid {
                line: 0,
                uid: w[0].uid,
            });
        }
    }
    Ok(Uidlist { header, records })
}

fn complete_line(raw: &str, line_no: usize) -> Result<&str, UidlistError> {
    raw.strip_suffix('\n')
        .ok_or(UidlistError::Truncated(line_no))
}

fn parse_header(line: &str) -> Result<(u8, Header), UidlistError> {
    let bad = |why: &str| UidlistError::BadHeader(why.to_string());
    let mut fields = line.split(' ');
    match fields.next() {
        Some("3") => {}
        Some("1") => return parse_v1_header(fields),
        _ => return Err(bad("unsupported version")),
    }
    let mut header = Header::default();
    let mut extra = Vec::new();
    for field in fields.filter(|f| !f.is_empty()) {
        if !field.as_bytes()[0].is_ascii() {
            return Err(bad("non-ASCII field"));
        }
        let (key, value) = field.split_at(1);
        match key {
            "V" => header.uid_validity = value.parse().map_err(|_| bad("bad V"))?,
            "N" => header.next_uid = value.parse().map_err(|_| bad("bad N"))?,
            "G" => header.guid = Some(MailboxGuid::parse_hex(value).ok_or_else(|| bad("bad G"))?),
            _ if key.as_bytes()[0].is_ascii_uppercase() => extra.push(field),
            _ => return Err(bad("unknown field")),
        }
    }
    if header.uid_validity == 0 {
        return Err(bad("missing or zero V"));
    }
    header.extra = extra.join(" ");
    Ok((3, header))
}

fn parse_v1_header<'a>(
    mut fields: impl Iterator<Item = &'a str>,
) -> Result<(u8, Header), UidlistError> {
    let bad = |why: &str| UidlistError::BadHeader(why.to_string());
    let uid_validity = fields
        .next()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v != 0)
        .ok_or_else(|| bad("bad v1 uidvalidity"))?;
    let next_uid = fields
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("bad v1 next uid"))?;
    let header = Header {
        uid_validity,
        next_uid,
        ..Header::default()
    };
    Ok((1, header))
}

fn parse_uid(text: &str, line: usize) -> Result<u32, UidlistError> {
    match text.parse::<u32>() {
        Ok(uid) if uid != 0 && uid != u32::MAX && text.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(uid)
        }
        _ => Err(UidlistError::BadRecord {
            line,
            reason: "bad uid",
        }),
    }
}

fn parse_v3_record(line: &str, line_no: usize) -> Result<Record<'_>, UidlistError> {
    plain_v3_record(line).map_or_else(|| parse_v3_record_fields(line, line_no), Ok)
}

/// The common `<uid> :<name>` record without extension fields, or `None` for anything
/// else (which the general parser then reads, or rejects with its reason). Agrees with
/// the general parser wherever it answers; a byte loop, as this runs for every record.
fn plain_v3_record(line: &str) -> Option<Record<'_>> {
    let bytes = line.as_bytes();
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 10 || bytes.get(digits..digits + 2) != Some(b" :") {
        return None;
    }
    let uid = bytes[..digits]
        .iter()
        .fold(0u64, |n, &b| n * 10 + u64::from(b - b'0'));
    let uid = u32::try_from(uid)
        .ok()
        .filter(|&u| u != 0 && u != u32::MAX)?;
    let base = checked_base(&line[digits + 2..])?;
    Some(Record {
        uid,
        guid: None,
        ext: std::borrow::Cow::Borrowed(""),
        base,
    })
}

fn parse_v3_record_fields(line: &str, line_no: usize) -> Result<Record<'_>, UidlistError> {
    let bad = |reason| UidlistError::BadRecord {
        line: line_no,
        reason,
    };
    // The first " :" (searched by its ':', which a record has few of).
    let colon = line
        .match_indices(':')
        .map(|(i, _)| i)
        .find(|&i| i > 0 && line.as_bytes()[i - 1] == b' ')
        .map(|i| i - 1)
        .ok_or(bad("no ' :' before the file name"))?;
    let (head, name) = (&line[..colon], &line[colon + 2..]);
    let base = checked_base(name).ok_or(bad("bad file name"))?;
    let (uid_text, fields) = head.split_once(' ').unwrap_or((head, ""));
    let uid = parse_uid(uid_text, line_no)?;
    let (guid, ext) = split_guid_field(fields).ok_or(bad("bad extension field"))?;
    Ok(Record {
        uid,
        guid,
        ext,
        base,
    })
}

fn parse_v1_record(line: &str, line_no: usize) -> Result<Record<'_>, UidlistError> {
    let (uid_text, name) = line.split_once(' ').ok_or(UidlistError::BadRecord {
        line: line_no,
        reason: "no file name",
    })?;
    let uid = parse_uid(uid_text, line_no)?;
    let base = checked_base(name).ok_or(UidlistError::BadRecord {
        line: line_no,
        reason: "bad file name",
    })?;
    Ok(Record {
        uid,
        guid: None,
        ext: "".into(),
        base,
    })
}

/// The base of a recorded name: up to the first `:`, non-empty, without `/`.
fn checked_base(name: &str) -> Option<&str> {
    let base = name.split(':').next().unwrap_or("");
    (!base.is_empty() && !base.contains('/')).then_some(base)
}

/// Extracts a `G` field from the extension fields and keeps every other field, in order.
/// `None` when a field does not start with an uppercase letter or `G` is empty (Dovecot
/// calls that corruption).
fn split_guid_field(fields: &str) -> Option<(Option<&str>, std::borrow::Cow<'_, str>)> {
    let fields = fields.trim_matches(' ');
    let mut guid = None;
    let mut others: Vec<&str> = Vec::new();
    for field in fields.split(' ').filter(|f| !f.is_empty()) {
        if !field.as_bytes()[0].is_ascii_uppercase() {
            return None;
        }
        match field.strip_prefix('G') {
            Some("") => return None,
            Some(value) => guid = Some(value),
            None => others.push(field),
        }
    }
    let ext = match (guid, others.as_slice()) {
        (None, _) => std::borrow::Cow::Borrowed(fields),
        (Some(_), []) => std::borrow::Cow::Borrowed(""),
        (Some(_), [one]) => std::borrow::Cow::Borrowed(*one),
        (Some(_), many) => std::borrow::Cow::Owned(many.join(" ")),
    };
    Some((guid, ext))
}

/// An owned record for rendering.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OwnedRecord {
    /// The UID.
    pub uid: u32,
    /// `G` value when the GUID differs from the base name.
    pub guid: Option<String>,
    /// Other extension fields verbatim.
    pub ext: String,
    /// Base file name.
    pub base: String,
}

impl OwnedRecord {
    /// Copies a borrowed record.
    pub fn from_record(r: &Record<'_>) -> OwnedRecord {
        OwnedRecord {
            uid: r.uid,
            guid: r.guid.map(str::to_string),
            ext: r.ext.to_string(),
            base: r.base.to_string(),
        }
    }
}

/// Renders a v3 file. Records must be sorted by UID.
pub fn render(header: &Header, records: &[OwnedRecord]) -> String {
    let mut out = String::with_capacity(64 + records.len() * 64);
    push_header(&mut out, header);
    for r in records {
        push_record(&mut out, r.uid, &r.ext, r.guid.as_deref(), &r.base);
    }
    out
}

/// Appends the v3 header line.
pub fn push_header(out: &mut String, header: &Header) {
    out.push_str("3 V");
    push_u32(out, header.uid_validity);
    out.push_str(" N");
    push_u32(out, header.next_uid);
    if let Some(guid) = header.guid {
        use std::fmt::Write;
        let _ = write!(out, " G{guid}");
    }
    if !header.extra.is_empty() {
        out.push(' ');
        out.push_str(&header.extra);
    }
    out.push('\n');
}

/// Appends one record line: `<uid>[ <ext>][ G<guid>] :<base>`.
pub fn push_record(out: &mut String, uid: u32, ext: &str, guid: Option<&str>, base: &str) {
    push_u32(out, uid);
    if !ext.is_empty() {
        out.push(' ');
        out.push_str(ext);
    }
    if let Some(g) = guid {
        out.push_str(" G");
        out.push_str(g);
    }
    out.push_str(" :");
    out.push_str(base);
    out.push('\n');
}

/// Appends a number in decimal without going through `fmt` (one call per record).
fn push_u32(out: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or("0"));
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "3 V1700000000 N9 G0f1e2d3c4b5a69788796a5b4c3d2e1f0\n\
        5 :1700000100.M123456P4711.mx1,S=2048,W=2090\n\
        7 W4101 :1700000200.M5P1000.mx1\n\
        8 G1700000100.M123456P4711.mx1,S=2048,W=2090 :1700000300.M77P1001.mx1,S=2048,W=2090\n";

    #[test]
    fn parses_reference_sample() {
        let u = parse(SAMPLE).unwrap();
        assert_eq!(u.header.uid_validity, 1700000000);
        assert_eq!(u.header.next_uid, 9);
        assert_eq!(
            u.header.guid.unwrap().to_string(),
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
        );
        assert_eq!(u.records.len(), 3);
        assert_eq!(u.records[1].ext, "W4101");
        assert_eq!(
            u.records[2].guid,
            Some("1700000100.M123456P4711.mx1,S=2048,W=2090")
        );
        assert_eq!(u.records[2].base, "1700000300.M77P1001.mx1,S=2048,W=2090");
        assert_eq!(u.next_uid(), 9);
    }

    #[test]
    fn stale_n_is_corrected() {
        let u = parse("3 V1 N1\n1 :a\n2 :b\n").unwrap();
        assert_eq!(u.next_uid(), 3);
    }

    #[test]
    fn old_names_with_info_are_cut_to_base() {
        let u = parse("3 V1 N2\n1 :a,S=1:2,S\n").unwrap();
        assert_eq!(u.records[0].base, "a,S=1");
    }

    #[test]
    fn reads_courier_v1() {
        let u = parse("1 123 5\n3 a:2,S\n4 b\n").unwrap();
        assert_eq!(u.header.uid_validity, 123);
        assert_eq!(u.records[0].base, "a");
        assert_eq!(u.next_uid(), 5);
    }

    #[test]
    fn rejects_corruption() {
        assert!(matches!(parse(""), Err(UidlistError::BadHeader(_))));
        assert!(matches!(
            parse("3 V0 N1\n"),
            Err(UidlistError::BadHeader(_))
        ));
        assert!(matches!(parse("7 V1\n"), Err(UidlistError::BadHeader(_))));
        assert!(matches!(
            parse("3 V1 N1\n1 :a\n1 :b\n"),
            Err(UidlistError::DuplicateUid { line: 3, uid: 1 })
        ));
        assert!(matches!(
            parse("3 V1 N1\nx :a\n"),
            Err(UidlistError::BadRecord { line: 2, .. })
        ));
        assert!(matches!(
            parse("3 V1 N1\n1 a\n"),
            Err(UidlistError::BadRecord { .. })
        ));
        assert!(matches!(
            parse("3 V1 N1\n1 G :a\n"),
            Err(UidlistError::BadRecord { .. })
        ));
        assert!(matches!(
            parse("3 V1 N1\n1 :a\n2 :b"),
            Err(UidlistError::Truncated(3))
        ));
    }

    #[test]
    fn keeps_every_field_around_g_and_refuses_non_ascii_keys() {
        let u = parse("3 V1 N2\n1 W1 Gsomeguid P7 O3 :a\n").unwrap();
        assert_eq!(u.records[0].guid, Some("someguid"));
        assert_eq!(u.records[0].ext, "W1 P7 O3");
        assert!(matches!(
            parse("3 V1 N2 \u{e9}x\n"),
            Err(UidlistError::BadHeader(_))
        ));
    }

    #[test]
    fn unsorted_records_are_sorted() {
        let u = parse("3 V1 N1\n5 :a\n2 :b\n").unwrap();
        assert_eq!(u.records[0].uid, 2);
        assert!(matches!(
            parse("3 V1 N1\n5 :a\n2 :b\n5 :c\n"),
            Err(UidlistError::DuplicateUid { .. })
        ));
    }

    #[test]
    fn numbers_render_in_decimal() {
        for n in [0, 1, 9, 10, 99, 100, 4_294_967_295, 1_234_567_890] {
            let mut out = String::new();
            push_u32(&mut out, n);
            assert_eq!(out, n.to_string());
        }
    }

    #[test]
    fn render_round_trips() {
        let u = parse(SAMPLE).unwrap();
        let owned: Vec<_> = u.records.iter().map(OwnedRecord::from_record).collect();
        assert_eq!(render(&u.header, &owned), SAMPLE);
    }

    proptest::proptest! {
        #[test]
        fn rendered_records_parse_back(uids in proptest::collection::btree_set(1u32..1_000_000, 0..20)) {
            let records: Vec<OwnedRecord> = uids
                .iter()
                .map(|&uid| OwnedRecord {
                    uid,
                    guid: (uid % 3 == 0).then(|| format!("g{uid}")),
                    ext: if uid % 5 == 0 { format!("P{uid}") } else { String::new() },
                    base: format!("{uid}.M1P1.host,S=1"),
                })
                .collect();
            let header = Header { uid_validity: 9, next_uid: 1, guid: None, extra: String::new() };
            let text = render(&header, &records);
            let parsed = parse(&text).unwrap();
            let back: Vec<OwnedRecord> = parsed.records.iter().map(OwnedRecord::from_record).collect();
            proptest::prop_assert_eq!(back, records);
        }

        #[test]
        fn never_panics_on_arbitrary_text(text in "(?s).{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn the_plain_record_shortcut_agrees_with_the_general_parser(
            line in "[0-9]{0,12}( [GWP][a-z0-9]{0,3}){0,2} ?:?[a-z0-9:/ ]{0,8}",
        ) {
            if let Some(fast) = plain_v3_record(&line) {
                proptest::prop_assert_eq!(Ok(fast), parse_v3_record_fields(&line, 2));
            }
        }
    }
}

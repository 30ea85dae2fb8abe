//! Maildir file names: split `base[:2,FLAGS]`, read Dovecot's `,S=`/`,W=` fields, rebuild
//! names with other flags. Pure string work: never touches the filesystem.

use crate::model::Flags;

/// A parsed Maildir file name, borrowing from the name itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedName<'a> {
    /// Everything before the first `:`: the stable identity Dovecot keys the uidlist on.
    pub base: &'a str,
    /// Flags from a `:2,` info part (empty when there is none).
    pub flags: Flags,
    /// `,S=` physical size, when the base carries it.
    pub size: Option<u64>,
    /// `,W=` virtual size, when the base carries it.
    pub vsize: Option<u64>,
    /// True when the info part exists but is not a `2,` info we understand; such a name is
    /// copied verbatim (Dovecot shows the message without flags) and reported.
    pub odd_info: bool,
}

/// Why a file name cannot be a message at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty base (`:2,S`), which Dovecot renames away.
    #[error("empty base name")]
    EmptyBase,
    /// `,S=` or `,W=` without a decimal value.
    #[error("malformed {0} size field")]
    BadSize(&'static str),
    /// Control characters, which Dovecot refuses in uidlist names.
    #[error("control character in name")]
    ControlChar,
}

/// Parses one directory entry name from `cur/` or `new/`.
pub fn parse(name: &str) -> Result<ParsedName<'_>, NameError> {
    // One pass for the control characters and the first and last `:`.
    let (mut control, mut first, mut last) = (false, usize::MAX, 0);
    let maybe = |w| has_below(w, 0x20) || has_byte(w, 0x7f) || has_byte(w, b':');
    scan_bytes(name.as_bytes(), maybe, |i, b| {
        control |= b < 0x20 || b == 0x7f;
        if b == b':' {
            first = first.min(i);
            last = i;
        }
    });
    if control {
        return Err(NameError::ControlChar);
    }
    let (base, info) = if first == usize::MAX {
        (name, None)
    } else {
        (&name[..first], Some(&name[last + 1..]))
    };
    if base.is_empty() {
        return Err(NameError::EmptyBase);
    }
    let (size, vsize) = size_fields(base)?;
    let (flags, odd_info) = match info {
        None => (Flags::default(), false),
        Some(info) => match info.strip_prefix("2,") {
            Some(letters) => parse_flag_letters(letters),
            None => (Flags::default(), true),
        },
    };
    Ok(ParsedName {
        base,
        flags,
        size,
        vsize,
        odd_info,
    })
}

/// Reads the flag letters up to an optional `,` tail; a tail or a byte outside A–Z/a–z makes
/// the info odd (such names are carried verbatim, or rebuilt keeping the tail).
fn parse_flag_letters(info: &str) -> (Flags, bool) {
    let (letters, tail) = info.split_once(',').unwrap_or((info, ""));
    let mut flags = Flags::default();
    let mut odd = !tail.is_empty() || info.contains(',');
    for b in letters.bytes() {
        if !flags.insert_letter(b) {
            odd = true;
        }
    }
    (flags, odd)
}

/// The part of a `:2,` info after the flag letters, from its `,` on (empty when none).
pub fn info_tail(name: &str) -> &str {
    let Some(colon) = name.rfind(':') else {
        return "";
    };
    let Some(letters) = name[colon + 1..].strip_prefix("2,") else {
        return "";
    };
    letters.find(',').map_or("", |i| &letters[i..])
}

/// The first `,S=` and the first `,W=` of a base, each followed by decimal digits ending at
/// `,` or the end of the base; a malformed one is an error (`S=` reported first). One pass
/// from comma to comma: this runs for every message of every scan.
fn size_fields(base: &str) -> Result<(Option<u64>, Option<u64>), NameError> {
    let bytes = base.as_bytes();
    // Per key: not seen yet, or the first occurrence's value (None when malformed).
    let (mut s, mut w): (Option<Option<u64>>, Option<Option<u64>>) = (None, None);
    scan_bytes(
        bytes,
        |w| has_byte(w, b','),
        |start, b| {
            if b != b',' || bytes.get(start + 2) != Some(&b'=') {
                return;
            }
            let slot = match bytes.get(start + 1) {
                Some(b'S') => &mut s,
                Some(b'W') => &mut w,
                _ => return,
            };
            if slot.is_none() {
                let digits = &bytes[start + 3..];
                let end = digits
                    .iter()
                    .position(|&b| b == b',')
                    .unwrap_or(digits.len());
                *slot = Some(decimal(&digits[..end]));
            }
        },
    );
    match (s, w) {
        (Some(None), _) => Err(NameError::BadSize("S=")),
        (_, Some(None)) => Err(NameError::BadSize("W=")),
        (s, w) => Ok((s.flatten(), w.flatten())),
    }
}

/// Calls `visit` with the index and value of every byte of `bytes` in an 8-byte word for
/// which `maybe` (a SWAR test that never misses a byte of interest) holds, and of the last
/// few bytes: words without such a byte are skipped whole. File names are short, mostly
/// plain letters and digits, and this runs for every message of every scan.
fn scan_bytes(bytes: &[u8], maybe: impl Fn(u64) -> bool, mut visit: impl FnMut(usize, u8)) {
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("a chunk of 8 bytes"));
        if maybe(word) {
            for (k, &b) in chunk.iter().enumerate() {
                visit(at + k, b);
            }
        }
        at += 8;
    }
    for (k, &b) in chunks.remainder().iter().enumerate() {
        visit(at + k, b);
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// True when some byte of `word` is below `n` (`n` at most 128; exact as a yes/no).
fn has_below(word: u64, n: u8) -> bool {
    word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS != 0
}

/// True when some byte of `word` is `b`.
fn has_byte(word: u64, b: u8) -> bool {
    has_below(word ^ (ONES * u64::from(b)), 1)
}

/// A non-empty run of ASCII digits as a number (`None` when empty, not digits, or too big).
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

/// The reference for [`parse`]: the same rules written plainly.
#[cfg(test)]
fn parse_reference(name: &str) -> Result<ParsedName<'_>, NameError> {
    if name.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(NameError::ControlChar);
    }
    let (base, info) = match name.find(':') {
        Some(i) => (&name[..i], Some(&name[name.rfind(':').unwrap_or(i) + 1..])),
        None => (name, None),
    };
    if base.is_empty() {
        return Err(NameError::EmptyBase);
    }
    let size = size_field(base, b'S').map_err(|_| NameError::BadSize("S="))?;
    let vsize = size_field(base, b'W').map_err(|_| NameError::BadSize("W="))?;
    let (flags, odd_info) = match info {
        None => (Flags::default(), false),
        Some(info) => match info.strip_prefix("2,") {
            Some(letters) => parse_flag_letters(letters),
            None => (Flags::default(), true),
        },
    };
    Ok(ParsedName {
        base,
        flags,
        size,
        vsize,
        odd_info,
    })
}

/// The reference for [`size_fields`]: finds `,K=` (`key` is `b'S'` or `b'W'`) followed by
/// decimal digits ending at `,` or the end of the base.
#[cfg(test)]
fn size_field(base: &str, key: u8) -> Result<Option<u64>, ()> {
    let bytes = base.as_bytes();
    let mut at = 0;
    while let Some(comma) = bytes[at..].iter().position(|&b| b == b',') {
        let start = at + comma;
        if bytes.get(start + 1) == Some(&key) && bytes.get(start + 2) == Some(&b'=') {
            let digits = &bytes[start + 3..];
            let end = digits
                .iter()
                .position(|&b| b == b',')
                .unwrap_or(digits.len());
            let digits = &digits[..end];
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            return std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok())
                .map(Some)
                .ok_or(());
        }
        at = start + 1;
    }
    Ok(None)
}

/// Builds the name a message gets in `cur/` (always with an info part) or `new/` (with one
/// only when it has flags, as Dovecot does).
pub fn compose(base: &str, flags: Flags, in_new: bool) -> String {
    if in_new && flags.is_empty() {
        return base.to_string();
    }
    let mut name = String::with_capacity(base.len() + 12);
    name.push_str(base);
    name.push_str(":2,");
    flags.push_letters(&mut name);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dovecot_name() {
        let p = parse("1700000100.M123456P4711.mx1,S=2048,W=2090:2,FRSb").unwrap();
        assert_eq!(p.base, "1700000100.M123456P4711.mx1,S=2048,W=2090");
        assert_eq!(p.size, Some(2048));
        assert_eq!(p.vsize, Some(2090));
        assert_eq!(p.flags.to_letters(), "FRSb");
        assert!(!p.odd_info);
    }

    #[test]
    fn name_without_info_has_no_flags() {
        let p = parse("1700000100.M1P2.host").unwrap();
        assert_eq!(p.base, "1700000100.M1P2.host");
        assert!(p.flags.is_empty());
        assert_eq!(p.size, None);
    }

    #[test]
    fn keeps_passed_and_unknown_uppercase() {
        let p = parse("x:2,PSX").unwrap();
        assert_eq!(p.flags.to_letters(), "PSX");
    }

    #[test]
    fn odd_infos_are_flagged_not_rejected() {
        assert!(parse("x:1,foo").unwrap().odd_info);
        assert!(parse("x:2,S!").unwrap().odd_info);
        assert!(parse("x:3").unwrap().odd_info);
    }

    #[test]
    fn flag_letters_stop_at_a_tail() {
        let p = parse("x:2,Sa,xyz").unwrap();
        assert_eq!(p.flags.to_letters(), "Sa");
        assert!(p.odd_info);
        assert_eq!(info_tail("x:2,Sa,xyz"), ",xyz");
        assert_eq!(info_tail("x:2,Sa"), "");
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(parse(":2,S"), Err(NameError::EmptyBase));
        assert_eq!(parse("x,S=12a:2,S"), Err(NameError::BadSize("S=")));
        assert_eq!(parse("x,W=:2,S"), Err(NameError::BadSize("W=")));
        assert_eq!(parse("x\ny"), Err(NameError::ControlChar));
    }

    #[test]
    fn word_tests_see_every_byte_value_at_every_position() {
        for k in 0..8 {
            for v in 0..=255u8 {
                let mut bytes = [b'a'; 8];
                bytes[k] = v;
                let word = u64::from_le_bytes(bytes);
                assert_eq!(has_below(word, 0x20), v < 0x20, "{v:#x} at {k}");
                for probe in [0x7f, b':', b','] {
                    assert_eq!(has_byte(word, probe), v == probe, "{v:#x} at {k}");
                }
            }
        }
    }

    #[test]
    fn composes_sorted_letters() {
        let p = parse("b:2,baSR").unwrap();
        assert_eq!(compose("b", p.flags, false), "b:2,RSab");
        assert_eq!(compose("b", Flags::default(), true), "b");
        assert_eq!(compose("b", Flags::default(), false), "b:2,");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(text in "(?s).{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn parse_agrees_with_the_plain_version(
            name in "([a-z0-9.,:=SW\u{7f}\u{1}\u{e9}]|2,){0,40}",
        ) {
            proptest::prop_assert_eq!(parse(&name), parse_reference(&name));
        }

        #[test]
        fn word_tests_never_miss_a_byte(bytes in proptest::array::uniform8(proptest::num::u8::ANY)) {
            let word = u64::from_le_bytes(bytes);
            proptest::prop_assert_eq!(has_below(word, 0x20), bytes.iter().any(|&b| b < 0x20));
            for probe in [0x7f, b':', b','] {
                proptest::prop_assert_eq!(has_byte(word, probe), bytes.contains(&probe));
            }
        }

        #[test]
        fn one_pass_size_fields_agree_with_two_searches(
            base in "[0-9a-z.]{0,6}(,[SWX]=?[0-9a]{0,3}){0,4}",
            big in proptest::bool::ANY,
        ) {
            let base = if big { format!("{base},S=99999999999999999999") } else { base };
            let want = match (size_field(&base, b'S'), size_field(&base, b'W')) {
                (Err(()), _) => Err(NameError::BadSize("S=")),
                (_, Err(())) => Err(NameError::BadSize("W=")),
                (Ok(s), Ok(w)) => Ok((s, w)),
            };
            proptest::prop_assert_eq!(size_fields(&base), want);
        }
    }
}

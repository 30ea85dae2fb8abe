//! The dbox file format of `storage/m.N`: the file header line, then records of a 30-byte
//! message header (magic, type, hex size), the body, and a metadata block (GUID, received
//! time, virtual size, original mailbox). Parses bytes already in memory; every length is
//! checked before it is used. Never opens or writes a file itself.

use std::ops::Range;
use std::path::Path;

use super::Corrupt;

/// Size of the per-message header Dovecot writes (`M1e`).
pub const MSG_HEADER_SIZE: usize = 30;
/// Magic bytes opening a message header.
const MSG_MAGIC: [u8; 2] = [0x01, 0x02];
/// Magic line opening the metadata block after a body.
const META_MAGIC: &[u8] = b"\n\x01\x03\n";

/// The first line of a dbox file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// Length of the header line including its LF: the first message starts here.
    pub len: usize,
    /// Creation time (UNIX seconds), 0 when absent.
    pub created: u32,
}

/// Parses the header line `2 M1e C<hex>\n`. Only version 2 with 30-byte message headers
/// is accepted: that is all Dovecot 2.x writes.
pub fn parse_file_header(path: &Path, data: &[u8]) -> Result<FileHeader, Corrupt> {
    let end = data
        .iter()
        .take(256)
        .position(|&b| b == b'\n')
        .ok_or_else(|| Corrupt::new(path, "no dbox file header line"))?;
    let line = std::str::from_utf8(&data[..end])
        .map_err(|_| Corrupt::new(path, "dbox file header is not text"))?;
    let mut tokens = line.split(' ');
    if tokens.next() != Some("2") {
        return Err(Corrupt::new(
            path,
            format!("unsupported dbox version in header {line:?}"),
        ));
    }
    let mut header = FileHeader {
        len: end + 1,
        created: 0,
    };
    let mut msg_header_ok = false;
    for token in tokens {
        let (key, value) = token.split_at(token.len().min(1));
        match key {
            "M" => msg_header_ok = usize::from_str_radix(value, 16) == Ok(MSG_HEADER_SIZE),
            "C" => header.created = u32::from_str_radix(value, 16).unwrap_or(0),
            _ => {}
        }
    }
    if !msg_header_ok {
        return Err(Corrupt::new(
            path,
            format!("dbox header {line:?} lacks M1e (30-byte message headers)"),
        ));
    }
    Ok(header)
}

/// Metadata of one message, from the block after its body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// `G`: the message GUID as text (32 hex digits for native dbox mail).
    pub guid: String,
    /// `R`: received time (INTERNALDATE), UNIX seconds.
    pub received: Option<u64>,
    /// `V`: virtual size (CRLF line ends).
    pub virtual_size: Option<u64>,
    /// `B`: the mailbox the message was first saved to.
    pub orig_mailbox: Option<String>,
    /// `P`: POP3 UIDL.
    pub pop3_uidl: Option<String>,
    /// `X`: the body refers to attachments stored elsewhere (single-instance attachment
    /// storage); the bytes in the file are not the whole message.
    pub external_parts: bool,
}

/// One message record found in a dbox file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Byte range of the body in the file.
    pub body: Range<usize>,
    /// Byte range of the whole record (header, body, metadata): what the map calls
    /// offset and size.
    pub record: Range<usize>,
    /// The metadata.
    pub meta: Metadata,
}

/// Reads the record at `offset`. `map_size`, when the map index knows it (non-zero), must
/// equal the record's length.
pub fn read_message(
    path: &Path,
    data: &[u8],
    offset: usize,
    map_size: u32,
) -> Result<Message, Corrupt> {
    let at = |what: &str| Corrupt::new(path, format!("message at offset {offset}: {what}"));
    let header = data
        .get(offset..offset + MSG_HEADER_SIZE)
        .ok_or_else(|| at(&format!("past the end of the file ({} bytes)", data.len())))?;
    if header[..2] != MSG_MAGIC || header[2] != b'N' || header[29] != b'\n' {
        return Err(at("no dbox message header"));
    }
    let size = std::str::from_utf8(&header[13..29])
        .ok()
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or_else(|| at("bad message size in header"))?;
    let body_start = offset + MSG_HEADER_SIZE;
    let body_end = usize::try_from(size)
        .ok()
        .and_then(|s| body_start.checked_add(s))
        .filter(|&end| end <= data.len())
        .ok_or_else(|| {
            at(&format!(
                "body of {size} bytes runs past the end of the file"
            ))
        })?;
    if data.get(body_end..body_end + META_MAGIC.len()) != Some(META_MAGIC) {
        return Err(at("no metadata block after the body (truncated?)"));
    }
    let (meta, record_end) = parse_metadata(&data[body_end + META_MAGIC.len()..])
        .map(|(meta, used)| (meta, body_end + META_MAGIC.len() + used))
        .ok_or_else(|| at("metadata block not terminated (truncated?)"))?;
    if map_size != 0 && record_end - offset != map_size as usize {
        return Err(at(&format!(
            "record is {} bytes but the map index says {map_size}",
            record_end - offset
        )));
    }
    Ok(Message {
        body: body_start..body_end,
        record: offset..record_end,
        meta,
    })
}

/// Parses `<Key><value>\n` lines up to the empty line; returns the metadata and the bytes
/// used including the empty line, or `None` when the block is not terminated.
fn parse_metadata(bytes: &[u8]) -> Option<(Metadata, usize)> {
    let mut meta = Metadata::default();
    let mut pos = 0;
    loop {
        let len = bytes[pos..].iter().position(|&b| b == b'\n')?;
        let line = &bytes[pos..pos + len];
        pos += len + 1;
        let Some((&key, value)) = line.split_first() else {
            return Some((meta, pos));
        };
        let text = String::from_utf8_lossy(value);
        match key {
            b'G' => meta.guid = text.into_owned(),
            b'R' => meta.received = u64::from_str_radix(&text, 16).ok(),
            b'V' => meta.virtual_size = u64::from_str_radix(&text, 16).ok(),
            b'B' => meta.orig_mailbox = Some(text.into_owned()),
            b'P' => meta.pop3_uidl = Some(text.into_owned()),
            b'X' => meta.external_parts = true,
            _ => {}
        }
    }
}

/// The header line of a new dbox file created at `created` (UNIX seconds).
pub fn file_header(created: u32) -> Vec<u8> {
    format!("2 M1e C{created:x}\n").into_bytes()
}

/// Appends one message record to `out` as Dovecot writes it: the 30-byte header with the
/// body size in hex, the body, the metadata block (`R` received time, `V` virtual size, `G`
/// GUID, `B` original mailbox) and the empty line ending it. A value that would break its
/// line (a mailbox name with a line break, or one a peer sent) is left out: `B` is only
/// informational, and a stray line would end the metadata block early.
pub fn write_record(out: &mut Vec<u8>, body: &[u8], meta: &Metadata) {
    out.extend_from_slice(&MSG_MAGIC);
    out.extend_from_slice(b"N          ");
    out.extend_from_slice(format!("{:016X}\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(META_MAGIC);
    if let Some(received) = meta.received {
        out.extend_from_slice(format!("R{received:x}\n").as_bytes());
    }
    let vsize = meta.virtual_size.unwrap_or_else(|| virtual_size(body));
    out.extend_from_slice(format!("V{vsize:x}\n").as_bytes());
    out.extend_from_slice(format!("G{}\n", meta.guid).as_bytes());
    if let Some(mailbox) = meta
        .orig_mailbox
        .as_ref()
        .filter(|m| !m.contains(['\n', '\r', '\0']))
    {
        out.extend_from_slice(format!("B{mailbox}\n").as_bytes());
    }
    out.push(b'\n');
}

/// RFC822.SIZE of a body: every bare LF counted as CRLF.
pub fn virtual_size(body: &[u8]) -> u64 {
    let bare_lf = body
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' && (i == 0 || body[i - 1] != b'\r'))
        .count();
    (body.len() + bare_lf) as u64
}

/// Every record of a whole file in order, for health checks. Stops with an error at the
/// first record that does not parse.
pub fn read_all(path: &Path, data: &[u8]) -> Result<Vec<Message>, Corrupt> {
    let header = parse_file_header(path, data)?;
    let mut out = Vec::new();
    let mut offset = header.len;
    while offset < data.len() {
        let message = read_message(path, data, offset, 0)?;
        offset = message.record.end;
        out.push(message);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A dbox record as Dovecot writes it.
    pub(crate) fn record(body: &str, guid: &str) -> Vec<u8> {
        let mut out = vec![0x01, 0x02, b'N', b' '];
        out.extend_from_slice(b"         ");
        out.extend_from_slice(format!("{:016X}\n", body.len()).as_bytes());
        out.extend_from_slice(body.as_bytes());
        out.extend_from_slice(META_MAGIC);
        out.extend_from_slice(
            format!("R6553f100\nV{:x}\nG{guid}\nBINBOX\n\n", body.len() + 2).as_bytes(),
        );
        out
    }

    fn file(bodies: &[&str]) -> Vec<u8> {
        let mut out = b"2 M1e C6b037316\n".to_vec();
        for (i, body) in bodies.iter().enumerate() {
            out.extend(record(body, &format!("{i:032x}")));
        }
        out
    }

    #[test]
    fn reads_records_in_order() {
        let data = file(&["Subject: a\n\nhi\n", "Subject: b\n\nho\n"]);
        let path = Path::new("m.1");
        let all = read_all(path, &data).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(&data[all[0].body.clone()], b"Subject: a\n\nhi\n");
        assert_eq!(all[0].record.start, 16);
        assert_eq!(all[1].record.start, all[0].record.end);
        assert_eq!(all[1].meta.guid, format!("{:032x}", 1));
        assert_eq!(all[0].meta.received, Some(0x6553f100));
        assert_eq!(all[0].meta.orig_mailbox.as_deref(), Some("INBOX"));
        let size = all[1].record.len() as u32;
        assert!(read_message(path, &data, all[1].record.start, size).is_ok());
        let err = read_message(path, &data, all[1].record.start, size + 1).unwrap_err();
        assert!(
            err.to_string().starts_with("m.1: message at offset"),
            "{err}"
        );
    }

    #[test]
    fn written_records_read_back() {
        let mut data = file_header(0x6b037316);
        assert_eq!(data, b"2 M1e C6b037316\n");
        let meta = Metadata {
            guid: "0123".into(),
            received: Some(0x6553f100),
            orig_mailbox: Some("INBOX".into()),
            ..Metadata::default()
        };
        write_record(&mut data, b"Subject: x\r\n\nbody\n", &meta);
        let all = read_all(Path::new("m.1"), &data).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(&data[all[0].body.clone()], b"Subject: x\r\n\nbody\n");
        assert_eq!(all[0].meta.guid, "0123");
        assert_eq!(all[0].meta.virtual_size, Some(20));
        assert_eq!(all[0].meta.received, Some(0x6553f100));
        assert_eq!(all[0].record.end, data.len());
    }

    #[test]
    fn a_mailbox_name_that_breaks_lines_is_not_written() {
        let meta = Metadata {
            guid: "0123".into(),
            orig_mailbox: Some("Evil\n\nGffff".into()),
            ..Metadata::default()
        };
        let mut data = file_header(1);
        write_record(&mut data, b"Subject: x\n\nbody\n", &meta);
        let all = read_all(Path::new("m.1"), &data).unwrap();
        assert_eq!(all[0].meta.guid, "0123");
        assert_eq!(all[0].meta.orig_mailbox, None);
        assert_eq!(all[0].record.end, data.len());
    }

    #[test]
    fn external_attachment_references_are_noticed() {
        let mut data = file_header(1);
        let plain = data.len();
        data.extend(record("Subject: a\n\nhi\n", "g1"));
        let with_x = data.len();
        let mut x = record("Subject: b\n\nstub\n", "g2");
        x.pop(); // the empty line ending the block
        x.extend_from_slice(b"X0 100 0 ab/cd\n\n");
        data.extend(x);
        let path = Path::new("m.1");
        assert!(
            !read_message(path, &data, plain, 0)
                .unwrap()
                .meta
                .external_parts
        );
        assert!(
            read_message(path, &data, with_x, 0)
                .unwrap()
                .meta
                .external_parts
        );
    }

    #[test]
    fn truncated_files_are_errors_naming_the_file() {
        let data = file(&["Subject: a\n\nhello\n"]);
        let path = Path::new("storage/m.7");
        for cut in [20, 40, data.len() - 3] {
            let err = read_all(path, &data[..cut]).unwrap_err();
            assert!(err.to_string().starts_with("storage/m.7: "), "{err}");
        }
        let err = read_message(path, &data, data.len() + 10, 0).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        assert!(parse_file_header(path, b"1 M1e\n").is_err());
        assert!(parse_file_header(path, b"2 M20 C1\n").is_err());
        assert!(parse_file_header(path, b"").is_err());
    }
}

//! Frames: a kind byte, a little-endian u32 length, the payload. The reader checks the
//! length against [`MAX_FRAME`] before allocating and rejects unknown kinds, so a hostile
//! peer can make a session fail but never make it allocate without bound or panic.

use std::io::{self, Read, Write};

/// Largest payload a frame may carry.
pub const MAX_FRAME: u32 = 16 << 20;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 5;

/// Frame kinds of protocol version 1 (`docs/protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Handshake.
    Hello = 1,
    /// Fatal error; the sender closes.
    Error = 2,
    /// A progress event (JSON), server to client.
    Event = 3,
    /// A request (JSON), client to server.
    Request = 4,
    /// The answer to the request in flight (JSON).
    Answer = 5,
    /// One segment of an object (a table, a plan, a key list).
    Part = 6,
    /// Header of one body: its key and metadata, or why it cannot be sent.
    BodyStart = 7,
    /// Part of a body.
    BodyChunk = 8,
    /// End of a body.
    BodyEnd = 9,
}

impl Kind {
    /// The kind for a byte, if the protocol knows it.
    pub fn from_byte(byte: u8) -> Option<Kind> {
        use Kind::*;
        const ALL: [Kind; 9] = [
            Hello, Error, Event, Request, Answer, Part, BodyStart, BodyChunk, BodyEnd,
        ];
        ALL.iter().copied().find(|k| *k as u8 == byte)
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended between frames (a clean end only where the protocol allows one).
    #[error("connection closed")]
    Closed,
    /// The stream ended inside a frame.
    #[error("connection lost in the middle of a frame")]
    Truncated,
    /// A kind byte the protocol does not have.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A length over [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(u32),
    /// The transport failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Writes one frame. Payloads over [`MAX_FRAME`] are a bug in the caller.
pub fn write_frame(out: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame payload too large"))?;
    let mut header = [0u8; HEADER_LEN];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&len.to_le_bytes());
    out.write_all(&header)?;
    out.write_all(payload)
}

/// Reads one frame, checking kind and length before allocating.
pub fn read_frame(input: &mut impl Read) -> Result<Frame, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    match read_full(input, &mut header)? {
        0 => return Err(FrameError::Closed),
        n if n < HEADER_LEN => return Err(FrameError::Truncated),
        _ => {}
    }
    let kind = Kind::from_byte(header[0]).ok_or(FrameError::UnknownKind(header[0]))?;
    let len = u32::from_le_bytes(header[1..].try_into().expect("4 bytes"));
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    if read_full(input, &mut payload)? < payload.len() {
        return Err(FrameError::Truncated);
    }
    Ok(Frame { kind, payload })
}

pub use crate::storage::maildir::writer::read_full;

/// A cursor over a payload whose every read is bounds-checked: a short or lying payload
/// yields `None`, never a panic or an oversized allocation.
#[derive(Debug)]
pub struct Payload<'a> {
    bytes: &'a [u8],
}

impl<'a> Payload<'a> {
    /// Reads from `bytes`.
    pub fn new(bytes: &'a [u8]) -> Payload<'a> {
        Payload { bytes }
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }

    /// A u8.
    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    /// A u16.
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    /// A u32.
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A u64.
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A length-prefixed UTF-8 string of at most `max` bytes.
    pub fn string(&mut self, max: usize) -> Option<&'a str> {
        let len = self.u32()? as usize;
        if len > max {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }

    /// True when every byte was consumed.
    pub fn is_done(&self) -> bool {
        self.bytes.is_empty()
    }

    /// How many bytes are left.
    pub fn left(&self) -> usize {
        self.bytes.len()
    }

    /// Every byte left.
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

/// Appends a length-prefixed string.
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Event, b"hello").unwrap();
        write_frame(&mut wire, Kind::Answer, b"").unwrap();
        let mut input = &wire[..];
        assert_eq!(
            read_frame(&mut input).unwrap(),
            Frame {
                kind: Kind::Event,
                payload: b"hello".to_vec()
            }
        );
        assert_eq!(read_frame(&mut input).unwrap().kind, Kind::Answer);
        assert!(matches!(read_frame(&mut input), Err(FrameError::Closed)));
    }

    #[test]
    fn hostile_headers_are_refused_before_allocation() {
        let huge = [Kind::Part as u8, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(FrameError::TooLarge(u32::MAX))
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 0, 0][..]),
            Err(FrameError::UnknownKind(0))
        ));
        assert!(matches!(
            read_frame(&mut &[1u8, 9, 0][..]),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &[1u8, 9, 0, 0, 0, 1, 2][..]),
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn payload_reads_are_bounded() {
        let mut out = Vec::new();
        put_string(&mut out, "abc");
        let mut p = Payload::new(&out);
        assert_eq!(p.string(10), Some("abc"));
        assert!(p.is_done());
        let mut lying = Payload::new(&[0xff, 0xff, 0xff, 0x7f, b'a']);
        assert_eq!(lying.string(usize::MAX), None);
        let mut capped = Payload::new(&out);
        assert_eq!(capped.string(2), None);
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut input = &bytes[..];
            while read_frame(&mut input).is_ok() {}
        }
    }
}

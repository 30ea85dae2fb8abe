//! A framed connection over any byte stream: counted frames, JSON control messages, objects
//! split into parts and zstd-compressed, body streams, and a bandwidth limit on the sending
//! side. Knows the framing of `docs/protocol.md`, not what requests mean; never spawns or
//! kills anything.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::frame::{FrameError, Kind, MAX_FRAME, read_frame, write_frame};

/// Largest object (table, plan, key list), raw or decompressed.
pub const MAX_OBJECT: usize = 1 << 30;

/// Largest body chunk, before compression.
pub const CHUNK: usize = 256 << 10;

/// Bytes of an object carried by one part frame.
const PART: usize = 1 << 20;

/// Why the session failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Framing failed (closed, truncated, oversized, unknown kind, I/O).
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The peer sent something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer reported a fatal error.
    #[error("{0}")]
    Remote(String),
    /// This side failed to carry out the request (the text names the path).
    #[error("{0}")]
    Failed(String),
}

impl WireError {
    /// A protocol violation.
    pub fn protocol(what: impl Into<String>) -> WireError {
        WireError::Protocol(what.into())
    }
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        WireError::Frame(FrameError::Io(e))
    }
}

/// Bytes and activity of one connection, shared by its two halves and a watchdog.
#[derive(Debug)]
pub struct Stats {
    sent: AtomicU64,
    received: AtomicU64,
    /// Milliseconds since `epoch` of the last byte received.
    last_received_ms: AtomicU64,
    /// Non-zero while a reader waits for the peer.
    waiting: AtomicU64,
    epoch: Instant,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            last_received_ms: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Stats {
    /// Bytes written to the peer.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes read from the peer.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// How long a reader has been waiting for the peer without getting a byte; zero when
    /// nobody waits.
    pub fn stalled_for(&self) -> Duration {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return Duration::ZERO;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_received_ms.load(Ordering::Relaxed)))
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_received_ms.store(now, Ordering::Relaxed);
    }
}

/// Counts bytes read and marks activity for the watchdog.
struct Counted<R> {
    inner: R,
    stats: Arc<Stats>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stats.touch();
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let result = self.inner.read(buf);
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        if let Ok(n) = result {
            self.stats.received.fetch_add(n as u64, Ordering::Relaxed);
            self.stats.touch();
        }
        result
    }
}

/// Reading half.
pub struct FrameReader {
    inner: BufReader<Counted<Box<dyn Read + Send>>>,
    zstd: bool,
    decompressor: Option<zstd::stream::raw::Decoder<'static>>,
}

/// One body header as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyHeader {
    /// Mailbox directory.
    pub dir: String,
    /// Subdirectory.
    pub sub: crate::model::Subdir,
    /// File name.
    pub name: String,
    /// What follows.
    pub status: BodyStatus,
}

/// Whether a body follows its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyStatus {
    /// Data follows.
    Data(crate::storage::maildir::writer::BodyMeta),
    /// The message is gone.
    Vanished,
    /// It could not be read.
    Failed(String),
}

impl FrameReader {
    /// Reads frames from `input`, counting into `stats`.
    pub fn new(input: Box<dyn Read + Send>, stats: Arc<Stats>) -> FrameReader {
        FrameReader {
            inner: BufReader::with_capacity(
                256 << 10,
                Counted {
                    inner: input,
                    stats,
                },
            ),
            zstd: false,
            decompressor: None,
        }
    }

    /// Turns zstd on after the handshake agreed on it.
    pub fn set_zstd(&mut self, on: bool) {
        self.zstd = on;
    }

    /// The next frame, with the peer's `Error` turned into [`WireError::Remote`].
    pub fn frame(&mut self) -> Result<(Kind, Vec<u8>), WireError> {
        let frame = read_frame(&mut self.inner)?;
        if frame.kind == Kind::Error {
            let text = String::from_utf8_lossy(&frame.payload).into_owned();
            return Err(WireError::Remote(text));
        }
        Ok((frame.kind, frame.payload))
    }

    /// The next frame, which must be of `kind`.
    pub fn expect(&mut self, kind: Kind) -> Result<Vec<u8>, WireError> {
        let (mut got, mut payload) = self.frame()?;
        // Keepalive and progress events may come between any two messages.
        while got == Kind::Event && kind != Kind::Event {
            (got, payload) = self.frame()?;
        }
        if got != kind {
            return Err(WireError::protocol(format!(
                "expected {kind:?}, got {got:?}"
            )));
        }
        Ok(payload)
    }

    /// Decodes a JSON payload.
    pub fn json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
        serde_json::from_slice(payload)
            .map_err(|e| WireError::protocol(format!("malformed message: {e}")))
    }

    /// Reads one object whose first part frame has already been read as `first`.
    pub fn object_from(&mut self, first: Vec<u8>) -> Result<Vec<u8>, WireError> {
        let mut raw = Vec::new();
        let mut part = first;
        loop {
            let (&more, segment) = part
                .split_first()
                .ok_or_else(|| WireError::protocol("empty object part"))?;
            if raw.len() + segment.len() > MAX_OBJECT {
                return Err(WireError::protocol("object exceeds the 1 GiB limit"));
            }
            raw.extend_from_slice(segment);
            match more {
                0 => break,
                1 => part = self.expect(Kind::Part)?,
                _ => return Err(WireError::protocol("bad object part flag")),
            }
        }
        if !self.zstd {
            return Ok(raw);
        }
        let mut out = Vec::new();
        let decoder = zstd::stream::read::Decoder::new(&raw[..])?;
        decoder
            .take(MAX_OBJECT as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| WireError::protocol(format!("bad compressed object: {e}")))?;
        if out.len() > MAX_OBJECT {
            return Err(WireError::protocol("object exceeds the 1 GiB limit"));
        }
        Ok(out)
    }

    /// Reads one object.
    pub fn object(&mut self) -> Result<Vec<u8>, WireError> {
        let first = self.expect(Kind::Part)?;
        self.object_from(first)
    }

    /// Reads a body header.
    pub fn body_header(&mut self) -> Result<BodyHeader, WireError> {
        let payload = self.expect(Kind::BodyStart)?;
        super::codec::decode_body_header(&payload)
    }

    /// Decompresses one body chunk (at most [`CHUNK`] bytes). With zstd, the chunks of one
    /// direction are one stream for the whole session, flushed at every chunk's end, so a
    /// message compresses against the ones before it.
    pub fn chunk(&mut self, payload: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.chunk_into(payload, &mut out)?;
        Ok(out)
    }

    /// [`FrameReader::chunk`] into `out` (cleared first), so that one buffer serves a whole
    /// stream.
    pub fn chunk_into(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        out.clear();
        if !self.zstd {
            if payload.len() > CHUNK {
                return Err(WireError::protocol("a body chunk beyond 256 KiB"));
            }
            out.extend_from_slice(payload);
            return Ok(());
        }
        let bad = |e: io::Error| WireError::protocol(format!("bad compressed body chunk: {e}"));
        if self.decompressor.is_none() {
            let mut d = zstd::stream::raw::Decoder::new()?;
            d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(27))
                .map_err(bad)?;
            self.decompressor = Some(d);
        }
        let decoder = self.decompressor.as_mut().expect("set above");
        let mut input = InBuffer::around(payload);
        // Room for one whole chunk and one byte more: a chunk that fills it all is too long.
        out.reserve(CHUNK + 1);
        loop {
            let at = out.len();
            decoder
                .run(&mut input, &mut OutBuffer::around_pos(out, at))
                .map_err(bad)?;
            if out.len() > CHUNK {
                return Err(WireError::protocol(
                    "a body chunk decompresses beyond 256 KiB",
                ));
            }
            // The buffer is not full (a full one is past CHUNK, refused above): zstd wrote
            // all it could, so the chunk is complete once its input is consumed.
            if input.pos() == payload.len() {
                return Ok(());
            }
        }
    }
}

/// The receiving end of a body stream: hands out bodies in the order they arrive, skips
/// those nobody asked for, and remembers a body left half-read so the next one starts at a
/// frame boundary. Once the stream breaks, every later body fails with the same reason.
pub struct Inbox {
    /// The frames.
    pub reader: FrameReader,
    /// Bodies still expected in this stream.
    expected: usize,
    /// Bytes still to come of the body being read; `None` between bodies.
    left: Option<u64>,
    pending: Vec<u8>,
    pos: usize,
    broken: Option<String>,
}

impl Inbox {
    /// Wraps a reader.
    pub fn new(reader: FrameReader) -> Inbox {
        Inbox {
            reader,
            expected: 0,
            left: None,
            pending: Vec::new(),
            pos: 0,
            broken: None,
        }
    }

    /// A new stream of `count` bodies begins.
    pub fn expect_bodies(&mut self, count: usize) {
        self.expected = count;
    }

    /// Bodies of the stream not consumed yet.
    pub fn bodies_left(&self) -> usize {
        self.expected
    }

    /// Why the stream broke, if it did.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn fail(&mut self, why: String) -> WireError {
        self.broken.get_or_insert(why.clone());
        self.left = None;
        self.expected = 0;
        WireError::protocol(why)
    }

    /// Skips bodies until the one for `key`, and returns its status; with
    /// [`BodyStatus::Data`], its bytes are then read through [`Inbox::read_body`].
    pub fn next_body(
        &mut self,
        key: (&str, crate::model::Subdir, &str),
    ) -> Result<BodyStatus, WireError> {
        if let Some(why) = &self.broken {
            return Err(WireError::protocol(why.clone()));
        }
        self.finish_body()?;
        loop {
            if self.expected == 0 {
                return Err(self.fail(format!("the peer did not send {}", key.2)));
            }
            let header = match self.reader.body_header() {
                Ok(h) => h,
                Err(e) => return Err(self.fail(e.to_string())),
            };
            self.expected -= 1;
            if let BodyStatus::Data(meta) = &header.status {
                self.left = Some(meta.len);
                self.pending.clear();
                self.pos = 0;
            }
            if (header.dir.as_str(), header.sub, header.name.as_str()) == key {
                return Ok(header.status);
            }
            self.finish_body()?;
        }
    }

    /// Reads and drops what is left of the current body.
    pub fn finish_body(&mut self) -> Result<(), WireError> {
        let mut sink = [0u8; 8192];
        while self.left.is_some() {
            // An error here either failed this body only (the sender said so) or broke the
            // stream; both end the body.
            let _ = self.read_body(&mut sink);
        }
        match &self.broken {
            Some(why) => Err(WireError::protocol(why.clone())),
            None => Ok(()),
        }
    }

    /// Skips every body left in the stream.
    pub fn drain(&mut self) -> Result<(), WireError> {
        self.finish_body()?;
        while self.expected > 0 {
            let header = match self.reader.body_header() {
                Ok(h) => h,
                Err(e) => return Err(self.fail(e.to_string())),
            };
            self.expected -= 1;
            if let BodyStatus::Data(meta) = header.status {
                self.left = Some(meta.len);
                self.finish_body()?;
            }
        }
        Ok(())
    }

    /// Reads bytes of the current body; `Ok(0)` at its complete end. A body the sender
    /// failed is an error for that body only.
    pub fn read_body(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.pending.len() {
                let n = buf.len().min(self.pending.len() - self.pos);
                buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if let Some(why) = &self.broken {
                return Err(io::Error::other(why.clone()));
            }
            let Some(left) = self.left else {
                return Ok(0);
            };
            let frame = match self.reader.frame() {
                Ok(frame) => frame,
                Err(e) => return Err(io::Error::other(self.fail(e.to_string()))),
            };
            match frame {
                (Kind::BodyChunk, payload) => {
                    let mut chunk = std::mem::take(&mut self.pending);
                    if let Err(e) = self.reader.chunk_into(&payload, &mut chunk) {
                        return Err(io::Error::other(self.fail(e.to_string())));
                    }
                    if chunk.len() as u64 > left {
                        let why = "body longer than announced".to_string();
                        return Err(io::Error::other(self.fail(why)));
                    }
                    self.left = Some(left - chunk.len() as u64);
                    self.pending = chunk;
                    self.pos = 0;
                }
                (Kind::BodyEnd, payload) => {
                    self.left = None;
                    match super::codec::decode_body_end(&payload) {
                        Ok(BodyEnd::Complete) if left == 0 => return Ok(0),
                        Ok(BodyEnd::Complete) => {
                            let why = "body shorter than announced".to_string();
                            return Err(io::Error::other(self.fail(why)));
                        }
                        Ok(BodyEnd::Failed(why)) => return Err(io::Error::other(why)),
                        Err(e) => return Err(io::Error::other(self.fail(e.to_string()))),
                    }
                }
                (other, _) => {
                    let why = format!("expected a body chunk, got {other:?}");
                    return Err(io::Error::other(self.fail(why)));
                }
            }
        }
    }
}

/// Reads the current body of a locked [`Inbox`]; dropping it mid-body skips the rest.
pub struct BodyReader<'a> {
    inbox: std::sync::MutexGuard<'a, Inbox>,
}

impl<'a> BodyReader<'a> {
    /// Reads from `inbox`, whose [`Inbox::next_body`] returned data.
    pub fn new(inbox: std::sync::MutexGuard<'a, Inbox>) -> BodyReader<'a> {
        BodyReader { inbox }
    }
}

impl Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inbox.read_body(buf)
    }
}

impl Drop for BodyReader<'_> {
    fn drop(&mut self) {
        let _ = self.inbox.finish_body();
    }
}

/// How a body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyEnd {
    /// All bytes arrived.
    Complete,
    /// The sender failed mid-body.
    Failed(String),
}

/// Sending half.
pub struct FrameWriter {
    inner: BufWriter<Box<dyn Write + Send>>,
    stats: Arc<Stats>,
    zstd_level: Option<i32>,
    compressor: Option<zstd::stream::raw::Encoder<'static>>,
    limit: Option<RateLimit>,
    /// Reused for every body: a chunk read from the file, and the compressed chunk. Fresh
    /// buffers this large come from `mmap` and cost a page fault per page, per body.
    plain: Vec<u8>,
    packed: Vec<u8>,
}

/// A bandwidth limit: sleeps so that the average rate stays under `bytes_per_sec`.
#[derive(Debug)]
struct RateLimit {
    bytes_per_sec: u64,
    started: Instant,
    sent: u64,
}

/// How far ahead of the average rate time spent not sending lets a sender get. Without a
/// cap, the seconds a session spends scanning and planning were all "saved up", and the
/// bodies that followed left at full speed — past the `--bwlimit` an admin set to spare a
/// link. (rsync keeps no credit at all.)
const BURST: Duration = Duration::from_millis(250);

impl RateLimit {
    fn account(&mut self, bytes: usize) {
        let pause = self.pause_after(bytes, Instant::now());
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }

    /// How long to wait, at `now`, after sending `bytes` more.
    fn pause_after(&mut self, bytes: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.started);
        let due = self.due();
        if elapsed > due + BURST {
            // Idle for a while: forget the credit beyond one burst.
            self.started += elapsed - due - BURST;
        }
        self.sent += bytes as u64;
        let elapsed = now.saturating_duration_since(self.started);
        self.due().saturating_sub(elapsed)
    }

    /// When the bytes sent so far are due at the average rate, from `started`.
    fn due(&self) -> Duration {
        Duration::from_secs_f64(self.sent as f64 / self.bytes_per_sec as f64)
    }
}

impl FrameWriter {
    /// Writes frames to `output`, counting into `stats`.
    pub fn new(output: Box<dyn Write + Send>, stats: Arc<Stats>) -> FrameWriter {
        FrameWriter {
            inner: BufWriter::with_capacity(256 << 10, output),
            stats,
            zstd_level: None,
            compressor: None,
            limit: None,
            plain: Vec::new(),
            packed: Vec::new(),
        }
    }

    /// Compresses objects and body chunks at `level` (`None`: off).
    pub fn set_zstd(&mut self, level: Option<i32>) {
        self.zstd_level = level;
        self.compressor = None;
    }

    /// Sends at zstd `level` from now on, when compression is on and no body has been
    /// sent yet: the bodies of one direction are one zstd stream, which a new encoder
    /// would break. Returns whether the level took.
    pub fn set_zstd_level(&mut self, level: i32) -> bool {
        let unbegun = self.zstd_level.is_some() && self.compressor.is_none();
        if unbegun {
            self.zstd_level = Some(level);
        }
        unbegun
    }

    /// Limits the sending rate (bytes per second; 0 = unlimited).
    pub fn set_bwlimit(&mut self, bytes_per_sec: u64) {
        self.limit = (bytes_per_sec > 0).then(|| RateLimit {
            bytes_per_sec,
            started: Instant::now(),
            sent: 0,
        });
    }

    /// Writes one frame (buffered).
    pub fn frame(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        write_frame(&mut self.inner, kind, payload)?;
        let bytes = payload.len() + super::frame::HEADER_LEN;
        self.stats.sent.fetch_add(bytes as u64, Ordering::Relaxed);
        if let Some(limit) = &mut self.limit {
            limit.account(bytes);
        }
        Ok(())
    }

    /// Writes a JSON message of `kind` and flushes.
    pub fn json(&mut self, kind: Kind, value: &impl Serialize) -> io::Result<()> {
        let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
        self.frame(kind, &bytes)?;
        self.flush()
    }

    /// Sends a fatal error and flushes.
    pub fn error(&mut self, text: &str) -> io::Result<()> {
        let text: String = text.chars().take(4096).collect();
        self.frame(Kind::Error, text.as_bytes())?;
        self.flush()
    }

    /// Writes one object as part frames (compressed when zstd is on).
    pub fn object(&mut self, bytes: &[u8]) -> io::Result<()> {
        let compressed;
        let bytes = match self.zstd_level {
            Some(level) => {
                compressed = zstd::stream::encode_all(bytes, level)?;
                &compressed[..]
            }
            None => bytes,
        };
        let mut parts = bytes.chunks(PART).peekable();
        if parts.peek().is_none() {
            return self.frame(Kind::Part, &[0]);
        }
        let mut payload = Vec::with_capacity(PART.min(bytes.len()) + 1);
        while let Some(segment) = parts.next() {
            payload.clear();
            payload.push(u8::from(parts.peek().is_some()));
            payload.extend_from_slice(segment);
            self.frame(Kind::Part, &payload)?;
        }
        Ok(())
    }

    /// Sends a body: header, chunks read from `data`, end. A read error mid-body becomes a
    /// failed end, so the receiver discards the partial body and the session goes on.
    pub fn body(
        &mut self,
        key: (&str, crate::model::Subdir, &str),
        meta: &crate::storage::maildir::writer::BodyMeta,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let header = super::codec::encode_body_header(key, &BodyStatus::Data(*meta));
        self.frame(Kind::BodyStart, &header)?;
        let mut buf = std::mem::take(&mut self.plain);
        buf.resize(CHUNK, 0);
        let sent = self.body_chunks(key.2, meta.len, data, &mut buf);
        self.plain = buf;
        sent
    }

    /// The chunks of one body and its end frame, read through `buf`.
    fn body_chunks(
        &mut self,
        name: &str,
        len: u64,
        data: &mut dyn Read,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let want = (left.min(CHUNK as u64)) as usize;
            let n = match super::frame::read_full(data, &mut buf[..want]) {
                Ok(0) => {
                    let why = format!("{name}: file shrank while it was sent");
                    return self.frame(Kind::BodyEnd, &super::codec::encode_body_end(Some(&why)));
                }
                Ok(n) => n,
                Err(e) => {
                    let why = format!("{name}: {e}");
                    return self.frame(Kind::BodyEnd, &super::codec::encode_body_end(Some(&why)));
                }
            };
            left -= n as u64;
            self.chunk(&buf[..n])?;
        }
        self.frame(Kind::BodyEnd, &super::codec::encode_body_end(None))
    }

    /// Sends a header that says the body cannot be sent.
    pub fn body_missing(
        &mut self,
        key: (&str, crate::model::Subdir, &str),
        status: &BodyStatus,
    ) -> io::Result<()> {
        let header = super::codec::encode_body_header(key, status);
        self.frame(Kind::BodyStart, &header)
    }

    fn chunk(&mut self, data: &[u8]) -> io::Result<()> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let Some(level) = self.zstd_level else {
            return self.frame(Kind::BodyChunk, data);
        };
        if self.compressor.is_none() {
            self.compressor = Some(zstd::stream::raw::Encoder::new(level)?);
        }
        let encoder = self.compressor.as_mut().expect("set above");
        let mut input = InBuffer::around(data);
        // Compressed straight into one reused buffer, room made whenever it fills.
        let mut out = std::mem::take(&mut self.packed);
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(data.len()) + 64);
        let room = |out: &mut Vec<u8>| {
            if out.capacity() - out.len() < 1024 {
                out.reserve(64 << 10);
            }
        };
        while input.pos() < data.len() {
            room(&mut out);
            let at = out.len();
            encoder.run(&mut input, &mut OutBuffer::around_pos(&mut out, at))?;
        }
        loop {
            room(&mut out);
            let at = out.len();
            if encoder.flush(&mut OutBuffer::around_pos(&mut out, at))? == 0 {
                break;
            }
        }
        debug_assert!(out.len() <= MAX_FRAME as usize);
        let sent = self.frame(Kind::BodyChunk, &out);
        self.packed = out;
        sent
    }

    /// Flushes buffered frames to the peer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Subdir;
    use crate::storage::maildir::writer::BodyMeta;

    fn pair(bytes: Vec<u8>, zstd: bool) -> FrameReader {
        let mut reader = FrameReader::new(Box::new(io::Cursor::new(bytes)), Arc::default());
        reader.set_zstd(zstd);
        reader
    }

    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn writer(zstd: bool) -> (FrameWriter, Arc<std::sync::Mutex<Vec<u8>>>) {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut w = FrameWriter::new(Box::new(Shared(buf.clone())), Arc::default());
        w.set_zstd(zstd.then_some(3));
        (w, buf)
    }

    #[test]
    fn objects_round_trip_across_parts_with_and_without_zstd() {
        for zstd in [false, true] {
            let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
            let (mut w, buf) = writer(zstd);
            w.object(&big).unwrap();
            w.object(b"").unwrap();
            w.flush().unwrap();
            let mut r = pair(buf.lock().unwrap().clone(), zstd);
            assert_eq!(r.object().unwrap(), big);
            assert_eq!(r.object().unwrap(), b"");
        }
    }

    #[test]
    fn bodies_round_trip_and_lengths_are_enforced() {
        for zstd in [false, true] {
            let body: Vec<u8> = (0..700_000u32).map(|i| (i % 13) as u8).collect();
            let meta = BodyMeta {
                mtime: (1_700_000_000, 5),
                mode: 0o600,
                uid: 1,
                gid: 2,
                len: body.len() as u64,
            };
            let (mut w, buf) = writer(zstd);
            w.body(("", Subdir::Cur, "a:2,S"), &meta, &mut &body[..])
                .unwrap();
            // A file that shrank: the sender says so instead of sending short data.
            let lying = BodyMeta { len: 10, ..meta };
            w.body(("", Subdir::Cur, "b"), &lying, &mut &b"abc"[..])
                .unwrap();
            w.flush().unwrap();
            let mut inbox = Inbox::new(pair(buf.lock().unwrap().clone(), zstd));
            inbox.expect_bodies(2);
            let status = inbox.next_body(("", Subdir::Cur, "a:2,S")).unwrap();
            assert_eq!(status, BodyStatus::Data(meta));
            let mut out = Vec::new();
            read_all(&mut inbox, &mut out).unwrap();
            assert_eq!(out, body);
            let status = inbox.next_body(("", Subdir::Cur, "b")).unwrap();
            assert_eq!(status, BodyStatus::Data(lying));
            let mut out = Vec::new();
            assert!(read_all(&mut inbox, &mut out).is_err());
            assert!(
                inbox.broken().is_none(),
                "a failed body leaves the stream usable"
            );
        }
    }

    #[test]
    fn the_level_changes_only_before_the_body_stream_begins() {
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("line {} of a message {}\n", i % 977, i % 13).into_bytes())
            .collect();
        let meta = BodyMeta {
            mtime: (0, 0),
            mode: 0o600,
            uid: 0,
            gid: 0,
            len: text.len() as u64,
        };
        let sent_at = |level: i32| {
            let (mut w, buf) = writer(true);
            assert!(w.set_zstd_level(level), "no body sent yet");
            w.body(("", Subdir::New, "a"), &meta, &mut &text[..])
                .unwrap();
            // Once the stream has begun, the level stays: the peer reads one stream.
            assert!(!w.set_zstd_level(1));
            w.body(("", Subdir::New, "b"), &meta, &mut &text[..])
                .unwrap();
            w.flush().unwrap();
            let bytes = buf.lock().unwrap().clone();
            let mut inbox = Inbox::new(pair(bytes.clone(), true));
            inbox.expect_bodies(2);
            for name in ["a", "b"] {
                inbox.next_body(("", Subdir::New, name)).unwrap();
                let mut out = Vec::new();
                read_all(&mut inbox, &mut out).unwrap();
                assert_eq!(out, text);
            }
            bytes.len()
        };
        assert!(
            sent_at(19) < sent_at(1),
            "level 19 packs tighter than level 1"
        );
        let (mut plain, _) = writer(false);
        assert!(!plain.set_zstd_level(19), "no level without zstd");
    }

    #[test]
    fn a_body_longer_than_announced_ends_the_session() {
        let (mut w, buf) = writer(false);
        let meta = BodyMeta {
            mtime: (0, 0),
            mode: 0o600,
            uid: 0,
            gid: 0,
            len: 100,
        };
        w.body(("", Subdir::New, "x"), &meta, &mut &[7u8; 100][..])
            .unwrap();
        w.flush().unwrap();
        // Rewrite the announced length to 50: the peer then sends more than it said.
        let mut bytes = buf.lock().unwrap().clone();
        let header = encode_header_with_len(50);
        bytes.splice(..header.len(), header);
        let mut inbox = Inbox::new(pair(bytes, false));
        inbox.expect_bodies(1);
        inbox.next_body(("", Subdir::New, "x")).unwrap();
        let mut out = Vec::new();
        assert!(read_all(&mut inbox, &mut out).is_err());
        assert!(inbox.broken().is_some());
    }

    fn encode_header_with_len(len: u64) -> Vec<u8> {
        let meta = BodyMeta {
            mtime: (0, 0),
            mode: 0o600,
            uid: 0,
            gid: 0,
            len,
        };
        let payload =
            crate::wire::codec::encode_body_header(("", Subdir::New, "x"), &BodyStatus::Data(meta));
        let mut out = vec![Kind::BodyStart as u8];
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    fn read_all(inbox: &mut Inbox, out: &mut Vec<u8>) -> io::Result<()> {
        let mut buf = [0u8; 1000];
        loop {
            match inbox.read_body(&mut buf)? {
                0 => return Ok(()),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[test]
    fn unasked_bodies_are_skipped_in_order() {
        let (mut w, buf) = writer(true);
        for name in ["a", "b", "c"] {
            let meta = BodyMeta {
                mtime: (0, 0),
                mode: 0o600,
                uid: 0,
                gid: 0,
                len: 3,
            };
            w.body(
                ("", Subdir::New, name),
                &meta,
                &mut name.repeat(3).as_bytes(),
            )
            .unwrap();
        }
        w.flush().unwrap();
        let mut inbox = Inbox::new(pair(buf.lock().unwrap().clone(), true));
        inbox.expect_bodies(3);
        inbox.next_body(("", Subdir::New, "c")).unwrap();
        let mut out = Vec::new();
        read_all(&mut inbox, &mut out).unwrap();
        assert_eq!(out, b"ccc");
        assert_eq!(inbox.bodies_left(), 0);
        assert!(inbox.next_body(("", Subdir::New, "d")).is_err());
    }

    #[test]
    fn a_zstd_bomb_is_refused() {
        let (mut w, buf) = writer(true);
        // 8 MiB of zeros compress to a few hundred bytes but exceed one chunk.
        let zeros = vec![0u8; 8 << 20];
        let compressed = zstd::bulk::compress(&zeros, 3).unwrap();
        w.frame(Kind::BodyChunk, &compressed).unwrap();
        w.flush().unwrap();
        let mut r = pair(buf.lock().unwrap().clone(), true);
        let (_, payload) = r.frame().unwrap();
        assert!(r.chunk(&payload).is_err());
    }

    #[test]
    fn an_uncompressed_chunk_past_256_kib_is_refused() {
        let (mut w, buf) = writer(false);
        w.frame(Kind::BodyChunk, &vec![b'x'; CHUNK + 1]).unwrap();
        w.frame(Kind::BodyChunk, &vec![b'y'; CHUNK]).unwrap();
        w.flush().unwrap();
        let mut r = pair(buf.lock().unwrap().clone(), false);
        let (_, too_long) = r.frame().unwrap();
        assert!(r.chunk(&too_long).is_err());
        let (_, whole) = r.frame().unwrap();
        assert_eq!(r.chunk(&whole).unwrap().len(), CHUNK);
    }

    #[test]
    fn one_reused_buffer_decompresses_chunk_after_chunk() {
        let (mut w, buf) = writer(true);
        let bodies: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; CHUNK - usize::from(i)]).collect();
        for body in &bodies {
            w.chunk(body).unwrap();
        }
        w.flush().unwrap();
        let mut r = pair(buf.lock().unwrap().clone(), true);
        let mut out = Vec::new();
        for body in &bodies {
            let (_, payload) = r.frame().unwrap();
            r.chunk_into(&payload, &mut out).unwrap();
            assert_eq!(&out, body);
        }
    }

    /// Time spent not sending earns at most one burst: after an idle minute, a megabyte
    /// at 1 MB/s still takes most of a second; while sending steadily, the average holds.
    #[test]
    fn idle_time_earns_at_most_one_burst() {
        let start = Instant::now();
        let mut limit = RateLimit {
            bytes_per_sec: 1_000_000,
            started: start,
            sent: 0,
        };
        let later = start + Duration::from_secs(60);
        let pause = limit.pause_after(1_000_000, later);
        assert_eq!(pause, Duration::from_secs(1) - BURST);
        // Sent as due: the next 100 KB wait their 0.1 s.
        let then = later + pause;
        assert_eq!(limit.pause_after(100_000, then), Duration::from_millis(100));
        // A fresh limit owes nothing before its first byte is sent.
        let mut fresh = RateLimit {
            bytes_per_sec: 1_000_000,
            started: start,
            sent: 0,
        };
        assert_eq!(fresh.pause_after(0, start), Duration::ZERO);
        assert_eq!(
            fresh.pause_after(500_000, start),
            Duration::from_millis(500)
        );
    }
}

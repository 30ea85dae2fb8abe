//! Fuzz target: arbitrary bytes from a hostile peer through the frame reader, the object
//! and body-stream decoders and every binary payload decoder. Must never panic, hang or
//! allocate beyond the protocol's limits.
#![no_main]

use std::io::Cursor;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mdsync::model::Subdir;
use mdsync::wire::codec;
use mdsync::wire::conn::{FrameReader, Inbox};
use mdsync::wire::frame::Kind;

fuzz_target!(|data: &[u8]| {
    let (zstd, bytes) = match data.split_first() {
        Some((flag, rest)) => (flag & 1 == 1, rest),
        None => return,
    };
    // A baseline both sides could hold: a one-row INBOX table.
    let mut inbox_table = mdsync::table::MailboxTable::default();
    let flags = mdsync::model::Flags::default();
    inbox_table.push(1, "1.M1P1.host,S=6:2,S", 13, flags, 6, None, 0);
    let baseline = mdsync::wire::table::encode(&inbox_table);
    for payload_decoder in [0u8, 1, 2, 3, 4, 5, 6] {
        let _ = match payload_decoder {
            0 => codec::decode_keys(bytes).map(|_| ()),
            1 => codec::decode_hashes(bytes, 2).map(|_| ()),
            2 => codec::decode_body_header(bytes).map(|_| ()),
            3 => codec::decode_body_end(bytes).map(|_| ()),
            4 => mdsync::wire::table::decode(bytes).map(|_| ()),
            5 => mdsync::wire::rows::apply(bytes, &baseline).map(|_| ()),
            _ => mdsync::wire::table::Shipped::from_bytes(bytes)
                .and_then(|s| s.resolve(Some(&baseline)))
                .map(|_| ()),
        };
    }
    let mut reader = FrameReader::new(Box::new(Cursor::new(bytes.to_vec())), Arc::default());
    reader.set_zstd(zstd);
    let mut inbox = Inbox::new(reader);
    inbox.expect_bodies(4);
    for _ in 0..64 {
        let frame = inbox.reader.frame();
        let Ok((kind, payload)) = frame else { break };
        match kind {
            Kind::Part => {
                let _ = inbox.reader.object_from(payload);
            }
            Kind::BodyChunk => {
                let _ = inbox.reader.chunk(&payload);
            }
            Kind::BodyStart => {
                if let Ok(h) = codec::decode_body_header(&payload) {
                    let _ = h;
                }
                let _ = inbox.next_body(("", Subdir::Cur, "x"));
                let mut buf = [0u8; 4096];
                while matches!(inbox.read_body(&mut buf), Ok(n) if n > 0) {}
            }
            _ => {}
        }
    }
});

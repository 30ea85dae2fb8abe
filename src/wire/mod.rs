//! Bytes on the wire between the brain and a remote replica: frames, the handshake, the
//! framed connection, the JSON messages, the binary payloads and the checks every path
//! from a peer must pass (see `docs/protocol.md`). Reads and writes only `Read`/`Write`
//! streams; knows nothing of processes or storage.

pub mod codec;
pub mod conn;
pub mod frame;
pub mod hello;
pub mod messages;
pub mod path;
pub mod rows;
pub mod table;

//! Bytes on the wire between the brain and a remote replica: frames, the handshake and the
//! checks every path from a peer must pass (see `docs/protocol.md`). Reads and writes only
//! `Read`/`Write` streams; knows nothing of processes, storage or plans.

pub mod frame;
pub mod hello;
pub mod path;

//! The handshake: both sides send `Hello` (magic, protocol version, capabilities, hash
//! version, program) and agree on the intersection of capabilities, or refuse.

use super::frame::{Payload, put_string};

/// Identifies an mdsync peer and the framing generation.
pub const MAGIC: &[u8; 8] = b"MDSYNC\0\x01";

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Version of the content-hash definition (xxh3-128 of the whole file, seed 0).
pub const HASH_VERSION: u16 = 1;

/// Capability: bodies may be zstd-compressed.
pub const CAP_ZSTD: u64 = 1 << 0;
/// Capability: content hashes can be asked for.
pub const CAP_HASH: u64 = 1 << 1;
/// Capability: several mailboxes rescanned in one request (`RescanMany`).
pub const CAP_RESCAN_MANY: u64 = 1 << 2;
/// Capability: a new mdbox tree can be written from a scan the client sends (`NewMdbox`).
pub const CAP_NEW_MDBOX: u64 = 1 << 3;
/// Capability: an `Apply` may also ask for bodies (`also_send`), which the server sends
/// while it receives the plan's.
pub const CAP_APPLY_SENDS: u64 = 1 << 4;
/// Capability: mailbox tables may come as row deltas (`wire::rows`, object tag 2).
pub const CAP_ROW_DELTA: u64 = 1 << 5;

/// One side's greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// Capability bits.
    pub capabilities: u64,
    /// Content-hash definition version.
    pub hash_version: u16,
    /// `mdsync <version>`, for messages.
    pub program: String,
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Not an mdsync peer (or a shell printing a banner on stdout).
    #[error("the peer is not mdsync (bad greeting); does the remote shell print anything?")]
    NotMdsync,
    /// Another protocol version.
    #[error(
        "the peer speaks protocol {0}, this mdsync speaks {PROTOCOL_VERSION}: install the same mdsync on both sides"
    )]
    Version(u16),
    /// Another hash definition.
    #[error("the peer hashes with version {0}, this mdsync with {HASH_VERSION}")]
    HashVersion(u16),
}

impl Hello {
    /// This build's greeting.
    pub fn ours(capabilities: u64) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            capabilities,
            hash_version: HASH_VERSION,
            program: format!("mdsync {}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.capabilities.to_le_bytes());
        out.extend_from_slice(&self.hash_version.to_le_bytes());
        put_string(&mut out, &self.program);
        out
    }

    /// Parses a payload.
    pub fn decode(payload: &[u8]) -> Result<Hello, HelloError> {
        let mut p = Payload::new(payload);
        if p.take(MAGIC.len()) != Some(&MAGIC[..]) {
            return Err(HelloError::NotMdsync);
        }
        let parsed = (|| {
            Some(Hello {
                version: p.u16()?,
                capabilities: p.u64()?,
                hash_version: p.u16()?,
                program: p.string(256)?.to_string(),
            })
        })();
        parsed.ok_or(HelloError::NotMdsync)
    }

    /// Checks the peer's greeting against ours; returns the shared capabilities.
    pub fn agree(&self, peer: &Hello) -> Result<u64, HelloError> {
        if peer.version != self.version {
            return Err(HelloError::Version(peer.version));
        }
        if peer.hash_version != self.hash_version {
            return Err(HelloError::HashVersion(peer.hash_version));
        }
        Ok(self.capabilities & peer.capabilities)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trips_and_negotiates() {
        let ours = Hello::ours(CAP_ZSTD | CAP_HASH);
        let back = Hello::decode(&ours.encode()).unwrap();
        assert_eq!(back, ours);
        let theirs = Hello::ours(CAP_HASH);
        assert_eq!(ours.agree(&theirs), Ok(CAP_HASH));
        let old = Hello {
            version: 0,
            ..theirs.clone()
        };
        assert_eq!(ours.agree(&old), Err(HelloError::Version(0)));
    }

    #[test]
    fn banners_and_garbage_are_not_mdsync() {
        assert_eq!(
            Hello::decode(b"Welcome to host!\n"),
            Err(HelloError::NotMdsync)
        );
        let mut truncated = Hello::ours(0).encode();
        truncated.truncate(12);
        assert_eq!(Hello::decode(&truncated), Err(HelloError::NotMdsync));
    }
}

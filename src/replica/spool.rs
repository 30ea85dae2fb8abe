//! Bodies read ahead from a streamed source into memory, so that one side's apply can read
//! them while the connection that brought them carries the other side's apply, or stage
//! them in parallel while the rest still arrive. Holds a bounded number of bytes; never
//! touches a disk.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Condvar, Mutex, OnceLock};

use crate::interrupt;
use crate::model::Subdir;
use crate::replica::{Body, BodyData, BodyError, BodySource, Key};
use crate::storage::maildir::writer::BodyMeta;

/// One body as the source answered for it.
enum Spooled {
    Data {
        meta: BodyMeta,
        bytes: Vec<u8>,
        origin: String,
    },
    Vanished(String),
    Failed(String),
}

/// Bodies fetched from a source up front, handed out again by key. A two-way sync with one
/// remote side fills it with what the local side needs while the remote side's apply
/// takes the connection, so the two applies (and their `syncfs`) overlap.
pub struct Spool {
    /// One slot per key expected, set once when its body has arrived.
    bodies: HashMap<Key, OnceLock<Spooled>>,
    /// How the filling stands.
    state: Mutex<Filling>,
    /// Woken at every body that arrives, at the end, and at the verdict.
    arrived: Condvar,
    /// `Some(source)` for a gated spool: its reader commits nothing before the filler's
    /// verdict (see [`Spool::settle`]); `source` names where the bodies come from.
    gate: Option<String>,
}

/// How the filling of a spool stands.
#[derive(Default)]
struct Filling {
    /// True once the filling stopped: a slot still empty then never fills.
    ended: bool,
    /// Whether the source delivered whole (`Err`: why not), once known.
    verdict: Option<Result<(), String>>,
}

impl Spool {
    /// Most planned body bytes read ahead: a plan that copies more streams its bodies
    /// straight into the tree instead, one apply after the other.
    pub const MAX_BYTES: u64 = 64 << 20;

    /// Most bytes a spool ever holds, whatever the planned sizes said (a file name's `S=`
    /// is the peer's word): a body past it fails alone instead of growing the spool.
    const HARD_CAP: u64 = 4 * Self::MAX_BYTES;

    /// Whether a plan copying `bytes` has its bodies read ahead under `limit` (the
    /// `--read-ahead` asked for): never an empty plan, never past [`Spool::MAX_BYTES`].
    /// The one rule for both ends of a session.
    pub fn reads_ahead(bytes: u64, limit: u64) -> bool {
        bytes > 0 && bytes <= limit.min(Self::MAX_BYTES)
    }

    /// An empty spool for the bodies `keys` names, to be filled by [`Spool::fill_from`] on
    /// another thread while an applier already reads from it: a body asked for before it
    /// arrived is waited for.
    pub fn expecting(keys: &[Key]) -> Spool {
        Spool {
            bodies: keys.iter().map(|k| (k.clone(), OnceLock::new())).collect(),
            state: Mutex::default(),
            arrived: Condvar::new(),
            gate: None,
        }
    }

    /// [`Spool::expecting`], gated: an applier reading from it stages bodies as they
    /// arrive but changes nothing Dovecot sees before [`Spool::settle`] said the source
    /// (`source`, for messages) delivered whole, and fails with its reason otherwise. A
    /// two-way sync's local side reads so from the far side, whose answer may break off.
    pub fn gated(keys: &[Key], source: String) -> Spool {
        Spool {
            gate: Some(source),
            ..Spool::expecting(keys)
        }
    }

    /// Announces `keys` to `source`, fills the spool from it and settles it with `whole`
    /// (asked once every body was read; some may have failed alone), or with the
    /// announcement's error if it could not be made.
    pub fn fill_announcing(
        &self,
        source: &(impl BodySource + ?Sized),
        keys: &[Key],
        whole: impl FnOnce() -> Result<(), BodyError>,
    ) {
        let announced = match keys.is_empty() {
            true => Ok(()),
            false => source.announce(keys),
        };
        if let Err(e) = announced {
            self.settle(Err(e));
            return;
        }
        self.fill_from(source, keys);
        self.settle(whole());
    }

    /// Says whether the source delivered whole; the first word counts, and the filling
    /// is over either way (readers of bodies still missing stop waiting).
    pub fn settle(&self, verdict: Result<(), BodyError>) {
        let mut state = lock(&self.state);
        state.ended = true;
        if state.verdict.is_none() {
            state.verdict = Some(verdict.map_err(|e| e.to_string()));
        }
        self.arrived.notify_all();
    }

    /// Settles the spool as broken off when dropped, unless it was settled already: the
    /// filler's side failed, or panicked, before it could say. No reader waits forever.
    pub fn settle_on_drop(&self) -> SettleOnDrop<'_> {
        SettleOnDrop(self)
    }

    /// True when the spool was settled as not delivered whole.
    pub fn broke_off(&self) -> bool {
        matches!(lock(&self.state).verdict, Some(Err(_)))
    }

    /// Reads the bodies `keys` names from `source` (already told them), in order, into the
    /// slots made by [`Spool::expecting`] with the same keys; then, or when it stops early
    /// (an interrupt, a panic), marks the spool ended so that no reader waits forever.
    /// A body that vanished, failed on the sending side, broke off, or would not fit is
    /// kept as a failure of that message alone, for the applier to skip or report, as it
    /// would have met it streaming (a broken connection fails every later body, and the
    /// session with it). After an interrupt the bodies not read yet are left out: the
    /// applier stops before it opens one.
    pub fn fill_from(&self, source: &(impl BodySource + ?Sized), keys: &[Key]) {
        let _end = EndOnDrop(self);
        let mut held = 0u64;
        for key in keys {
            if interrupt::requested() {
                break;
            }
            let spooled = match source.open_body(&key.dir, key.sub, &key.name) {
                Ok(body) => read_whole(body, Self::HARD_CAP.saturating_sub(held)),
                Err(BodyError::Vanished(origin)) => Spooled::Vanished(origin),
                Err(BodyError::Failed(why)) => Spooled::Failed(why),
            };
            if let Spooled::Data { bytes, .. } = &spooled {
                held += bytes.len() as u64;
            }
            if let Some(slot) = self.bodies.get(key) {
                // A key named twice is one body sent twice: the first copy stays.
                let _ = slot.set(spooled);
                let _state = lock(&self.state);
                self.arrived.notify_all();
            }
        }
    }

    /// The body of `key` once it arrived; `None` when it never will (not expected, or the
    /// filling ended without it).
    fn wait_for(&self, key: &Key) -> Option<&Spooled> {
        let slot = self.bodies.get(key)?;
        let mut state = lock(&self.state);
        loop {
            if let Some(spooled) = slot.get() {
                return Some(spooled);
            }
            if state.ended {
                return None;
            }
            state = self
                .arrived
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// The filler's verdict, once given.
    fn verdict(&self) -> Result<(), String> {
        let mut state = lock(&self.state);
        loop {
            if let Some(verdict) = &state.verdict {
                return verdict.clone();
            }
            state = self
                .arrived
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// See [`Spool::settle_on_drop`].
pub struct SettleOnDrop<'a>(&'a Spool);

impl Drop for SettleOnDrop<'_> {
    fn drop(&mut self) {
        self.0.settle(Err(BodyError::Failed(
            "the far side's answer ended before the bodies it was to send".into(),
        )));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Marks a spool's filling ended when dropped, however the filler leaves.
struct EndOnDrop<'a>(&'a Spool);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).ended = true;
        self.0.arrived.notify_all();
    }
}

/// Reads one opened body to its end: its data, or why not (a read error, a length other
/// than announced, or more than `room` bytes, left unread).
fn read_whole(mut body: Body<'_>, room: u64) -> Spooled {
    let len = body.meta.len;
    if len > room {
        return Spooled::Failed(format!(
            "{}: {len} bytes do not fit the read-ahead spool",
            body.origin
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    let read = body.data.as_read().take(len + 1).read_to_end(&mut bytes);
    match read {
        Err(e) => Spooled::Failed(format!("{}: {e}", body.origin)),
        Ok(n) if n as u64 != len => Spooled::Failed(format!(
            "{}: {n} bytes where {len} were announced",
            body.origin
        )),
        Ok(_) => Spooled::Data {
            meta: body.meta,
            bytes,
            origin: body.origin,
        },
    }
}

impl BodySource for Spool {
    fn open_body(&self, dir: &str, sub: Subdir, name: &str) -> Result<Body<'_>, BodyError> {
        let key = Key {
            dir: dir.to_string(),
            sub,
            name: name.to_string(),
        };
        match self.wait_for(&key) {
            Some(Spooled::Data {
                meta,
                bytes,
                origin,
            }) => Ok(Body {
                data: BodyData::Stream(Box::new(bytes.as_slice())),
                meta: *meta,
                origin: origin.clone(),
            }),
            Some(Spooled::Vanished(origin)) => Err(BodyError::Vanished(origin.clone())),
            Some(Spooled::Failed(why)) => Err(BodyError::Failed(why.clone())),
            None => Err(BodyError::Failed(format!(
                "{dir}/{}/{name}: not read ahead",
                sub.as_str()
            ))),
        }
    }

    fn settled(&self) -> crate::Result<()> {
        let Some(source) = &self.gate else {
            return Ok(());
        };
        self.verdict().map_err(|why| crate::Error::Remote {
            location: source.clone(),
            message: format!("cannot read bodies ahead: {why}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sequential source that hands out `bodies` in announced order and records what it
    /// was asked.
    struct Stream {
        bodies: Vec<(&'static str, Option<&'static [u8]>)>,
        announced: Mutex<Vec<Key>>,
        next: Mutex<usize>,
    }

    fn meta(len: usize) -> BodyMeta {
        BodyMeta {
            mtime: (1, 0),
            mode: 0o600,
            uid: 0,
            gid: 0,
            len: len as u64,
        }
    }

    impl BodySource for Stream {
        fn open_body(&self, _: &str, _: Subdir, name: &str) -> Result<Body<'_>, BodyError> {
            let mut next = self.next.lock().unwrap();
            let (expected, bytes) = self.bodies[*next];
            *next += 1;
            assert_eq!(name, expected, "opened out of announced order");
            match bytes {
                Some(b) => Ok(Body {
                    data: BodyData::Stream(Box::new(b)),
                    meta: meta(b.len()),
                    origin: format!("far:{name}"),
                }),
                None => Err(BodyError::Vanished(format!("far:{name}"))),
            }
        }

        fn sequential(&self) -> bool {
            true
        }

        fn announce(&self, keys: &[Key]) -> Result<(), BodyError> {
            self.announced.lock().unwrap().extend_from_slice(keys);
            Ok(())
        }
    }

    fn key(name: &str) -> Key {
        Key {
            dir: ".Work".into(),
            sub: Subdir::Cur,
            name: name.into(),
        }
    }

    fn held(spool: &Spool) -> usize {
        spool
            .bodies
            .values()
            .map(|s| match s.get() {
                Some(Spooled::Data { bytes, .. }) => bytes.len(),
                _ => 0,
            })
            .sum()
    }

    fn read(spool: &Spool, name: &str) -> Result<Vec<u8>, BodyError> {
        let mut body = spool.open_body(".Work", Subdir::Cur, name)?;
        let mut out = Vec::new();
        body.data.as_read().read_to_end(&mut out).unwrap();
        assert_eq!(body.meta.len, out.len() as u64);
        Ok(out)
    }

    #[test]
    fn bodies_are_announced_once_and_handed_out_in_any_order() {
        let source = Stream {
            bodies: vec![("m1", Some(b"one")), ("m2", None), ("m3", Some(b"three"))],
            announced: Mutex::default(),
            next: Mutex::default(),
        };
        let keys = [key("m1"), key("m2"), key("m3")];
        let spool = Spool::expecting(&keys);
        spool.fill_announcing(&source, &keys, || Ok(()));
        assert_eq!(*source.announced.lock().unwrap(), keys);
        assert_eq!(held(&spool), 8);
        assert_eq!(read(&spool, "m3").unwrap(), b"three");
        assert_eq!(read(&spool, "m1").unwrap(), b"one");
        assert!(matches!(read(&spool, "m2"), Err(BodyError::Vanished(_))));
        assert!(matches!(read(&spool, "m4"), Err(BodyError::Failed(_))));
        assert!(!spool.sequential(), "the applier may stage in parallel");
    }

    /// A source that hands out each body only when the test lets it, in order.
    struct Gated {
        gate: Mutex<std::sync::mpsc::Receiver<&'static [u8]>>,
    }

    impl BodySource for Gated {
        fn open_body(&self, _: &str, _: Subdir, name: &str) -> Result<Body<'_>, BodyError> {
            let gate = self.gate.lock().unwrap();
            let bytes = gate
                .recv()
                .map_err(|_| BodyError::Failed("closed".into()))?;
            Ok(Body {
                data: BodyData::Stream(Box::new(bytes)),
                meta: meta(bytes.len()),
                origin: format!("far:{name}"),
            })
        }
    }

    #[test]
    fn a_reader_waits_for_a_body_still_on_its_way() {
        let (let_through, gate) = std::sync::mpsc::channel();
        let source = Gated {
            gate: Mutex::new(gate),
        };
        let keys = [key("m1"), key("m2"), key("m3")];
        let spool = Spool::expecting(&keys);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| read(&spool, "m2"));
            let_through.send(&b"one"[..]).unwrap();
            let_through.send(&b"two"[..]).unwrap();
            // The third body fails on the sending side.
            drop(let_through);
            // The reader most likely asks before the filling starts, and waits.
            std::thread::sleep(std::time::Duration::from_millis(20));
            spool.fill_from(&source, &keys);
            assert_eq!(reader.join().unwrap().unwrap(), b"two");
        });
        assert_eq!(read(&spool, "m1").unwrap(), b"one");
        assert!(matches!(read(&spool, "m3"), Err(BodyError::Failed(_))));
        assert!(matches!(read(&spool, "m4"), Err(BodyError::Failed(_))));
    }

    #[test]
    fn a_filler_that_stops_early_leaves_no_reader_waiting() {
        let keys = [key("m1")];
        let spool = Spool::expecting(&keys);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| read(&spool, "m1"));
            let filler = scope.spawn(|| {
                let _end = EndOnDrop(&spool);
                panic!("the stream broke");
            });
            assert!(filler.join().is_err());
            assert!(matches!(reader.join().unwrap(), Err(BodyError::Failed(_))));
        });
    }

    #[test]
    fn a_gated_spool_is_settled_by_its_filler_and_the_first_word_counts() {
        let keys = [key("m1")];
        assert!(
            Spool::expecting(&keys).settled().is_ok(),
            "ungated: never waits"
        );
        let spool = Spool::gated(&keys, "far:b".into());
        std::thread::scope(|scope| {
            let waiting = scope.spawn(|| spool.settled());
            std::thread::sleep(std::time::Duration::from_millis(20));
            spool.settle(Ok(()));
            assert!(waiting.join().unwrap().is_ok());
        });
        spool.settle(Err(BodyError::Failed("too late".into())));
        assert!(spool.settled().is_ok() && !spool.broke_off());
        // A filler that leaves without a word leaves the spool broken off, not waiting.
        let spool = Spool::gated(&keys, "far:b".into());
        drop(spool.settle_on_drop());
        let why = spool.settled().unwrap_err().to_string();
        assert!(why.starts_with("far:b: cannot read bodies ahead"), "{why}");
        assert!(spool.broke_off());
        assert!(matches!(read(&spool, "m1"), Err(BodyError::Failed(_))));
    }

    #[test]
    fn only_a_plan_with_bytes_under_both_limits_is_read_ahead() {
        assert!(Spool::reads_ahead(1, 1));
        assert!(!Spool::reads_ahead(0, Spool::MAX_BYTES));
        assert!(!Spool::reads_ahead(2, 1));
        assert!(!Spool::reads_ahead(Spool::MAX_BYTES + 1, u64::MAX));
    }

    #[test]
    fn nothing_is_announced_for_no_keys() {
        let source = Stream {
            bodies: vec![],
            announced: Mutex::default(),
            next: Mutex::default(),
        };
        let spool = Spool::expecting(&[]);
        spool.fill_announcing(&source, &[], || Ok(()));
        assert!(source.announced.lock().unwrap().is_empty());
        assert_eq!(held(&spool), 0);
    }

    /// A reader that fails after `good` bytes, as a body the sender failed mid-way.
    struct Broken(usize);

    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("file shrank while it was sent"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(b'x');
            self.0 -= n;
            Ok(n)
        }
    }

    fn body<'a>(data: impl Read + 'a, announced: usize) -> Body<'a> {
        Body {
            data: BodyData::Stream(Box::new(data)),
            meta: meta(announced),
            origin: "far:m".into(),
        }
    }

    #[test]
    fn a_body_that_does_not_fit_or_is_not_what_was_announced_fails_alone() {
        let big = vec![7u8; 1024];
        let failed = |s: Spooled| matches!(s, Spooled::Failed(_));
        assert!(failed(read_whole(body(big.as_slice(), 1024), 1000)));
        assert!(failed(read_whole(body(big.as_slice(), 10), 1000)));
        assert!(failed(read_whole(body(&big[..5], 10), 1000)));
        assert!(failed(read_whole(body(Broken(100), 200), 1000)));
        assert!(!failed(read_whole(body(big.as_slice(), 1024), 1024)));
    }
}

//! A process-wide "stop soon" flag, set by SIGINT/SIGTERM handlers the CLI installs and
//! polled by the applier between operations. Never installs handlers itself.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// The shared flag, for `signal_hook::flag::register`.
pub fn flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

/// True once a stop was requested.
pub fn requested() -> bool {
    flag().load(Ordering::Relaxed)
}

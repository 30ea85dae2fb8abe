//! The brain: diff two replica tables into a plan (pure), guard it, and have the replicas
//! apply it — one-way (`backup`), or two-way (`twoway`: a three-way merge against the pair's
//! `base`, one plan per side). Watch is a further plan over the same tables.

pub mod apply;
pub mod apply_mdbox;
pub mod backup;
pub mod base;
pub mod diff;
pub mod mdbox_folders;
pub mod mdbox_new;
pub mod mdbox_pending;
pub mod merge;
pub mod plan;
pub mod predict;
pub mod state;
pub mod twoway;

use crate::replica::Replica;

/// Runs the work of two sides at once, each closure paired with its replica. A remote
/// side's work mostly waits on its connection: it runs on a thread of its own, so that it
/// does not hold one of the rayon threads the local side scans or stages with (on two
/// cores, half of them).
pub(crate) fn both<A: Send, B: Send>(
    (a, work_a): (&dyn Replica, impl FnOnce() -> A + Send),
    (b, work_b): (&dyn Replica, impl FnOnce() -> B + Send),
) -> (A, B) {
    match (a.wire_bytes().is_some(), b.wire_bytes().is_some()) {
        (false, true) => beside_remote(work_a, work_b),
        (true, false) => {
            let (done_b, done_a) = beside_remote(work_b, work_a);
            (done_a, done_b)
        }
        _ => rayon::join(work_a, work_b),
    }
}

/// Runs `local` here and `remote` on a thread of its own (see [`both`]).
pub(crate) fn beside_remote<L, R: Send>(
    local: impl FnOnce() -> L,
    remote: impl FnOnce() -> R + Send,
) -> (L, R) {
    std::thread::scope(|scope| {
        let remote = scope.spawn(remote);
        let local = local();
        let remote = remote
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (local, remote)
    })
}

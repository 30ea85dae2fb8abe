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
/// cores, half of them). While that connection is still logging in, the local side works
/// with one core left free (see [`leaving_a_core`]).
pub(crate) fn both<A: Send, B: Send>(
    (a, work_a): (&dyn Replica, impl FnOnce() -> A + Send),
    (b, work_b): (&dyn Replica, impl FnOnce() -> B + Send),
) -> (A, B) {
    match (a.wire_bytes().is_some(), b.wire_bytes().is_some()) {
        (false, true) => beside_remote(|| leaving_a_core(b.connecting(), work_a), work_b),
        (true, false) => {
            let (done_b, done_a) = beside_remote(|| leaving_a_core(a.connecting(), work_b), work_a);
            (done_a, done_b)
        }
        _ => rayon::join(work_a, work_b),
    }
}

/// Runs `work` on one rayon thread fewer than there are cores when it starts while the
/// remote side is still `connecting`, else as it is; a scan cannot change its pool
/// midway, so it keeps to that pool after the login too. Why: ssh's key exchange
/// (sntrup761x25519 by default) is single-threaded and costs about 0.1 CPU-s; a local scan
/// on every core slowed the login, and with it everything the far side does (the far
/// side started 312 ms after launch on average, 274 ms with a core left free, on two
/// cores), and the scan itself finished no sooner.
fn leaving_a_core<T: Send>(connecting: bool, work: impl FnOnce() -> T + Send) -> T {
    let cores = rayon::current_num_threads();
    if cores < 2 || !connecting {
        return work();
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(cores - 1)
        .thread_name(|i| format!("mdsync-scan-{i}"))
        .build()
    {
        Ok(pool) => pool.install(work),
        Err(_) => work(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_side_still_connecting_leaves_ssh_a_core() {
        let cores = rayon::current_num_threads();
        let left = leaving_a_core(true, rayon::current_num_threads);
        assert_eq!(left, cores.saturating_sub(1).max(1));
        assert_eq!(leaving_a_core(false, rayon::current_num_threads), cores);
    }
}

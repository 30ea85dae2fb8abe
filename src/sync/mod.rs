//! The brain: diff two replica tables into a plan (pure), guard it, and have the replicas
//! apply it. One-way backup today; two-way sync and watch are further plans over the same
//! tables.

pub mod apply;
pub mod apply_mdbox;
pub mod backup;
pub mod diff;
pub mod mdbox_new;
pub mod plan;
pub mod predict;
pub mod state;

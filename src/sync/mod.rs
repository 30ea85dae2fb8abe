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

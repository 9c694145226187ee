//! The daemon's actors. They hold little logic: they receive typed
//! messages, call plain modules, and do the I/O.

pub mod catalog;
pub mod netns;
pub mod operation;
pub mod records;
pub mod store;
pub mod vm;

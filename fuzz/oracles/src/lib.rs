//! The properties behind khived's fuzz targets, as plain functions.
//!
//! Each function takes one fuzz input and panics, with a message naming the broken property,
//! when khived misbehaves on it; any other outcome is a pass. The cargo-fuzz targets in
//! `fuzz/fuzz_targets/` call them under libFuzzer, and `tests/fuzz_regressions.rs` replays
//! every seed and every crash ever found through them with a plain `cargo test` on stable.
//!
//! They live outside the library so that no user's build compiles them. Only the connection
//! check needs something private, the per-connection handler, and reaches it through
//! `khived::fuzzing`, which exists only with khived's `__fuzzing` feature (turned on here).

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

mod alloc;
mod connection;
mod frame_reader;
mod request_decode;
mod worker_reply;

pub use alloc::{largest_allocation_while, CountingAllocator};
pub use connection::{connection, CONFIG_ID, NAMESPACE};
pub use frame_reader::{frame_reader, ALLOCATION_SLACK, READ_AHEAD};
pub use request_decode::request_decode;
pub use worker_reply::worker_reply;

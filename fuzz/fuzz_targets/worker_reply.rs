//! A line from a worker's stdout is parsed without panicking, and a reply it accepts means
//! the same once re-encoded; a request line is always exactly one line. The check is
//! `khived_oracles::worker_reply`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| khived_oracles::worker_reply(data));

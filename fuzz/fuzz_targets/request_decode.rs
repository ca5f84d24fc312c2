//! Bytes decoded as a `Request` (and a `Response`) must encode and decode back to the same
//! value, and never panic. The check is `khived_oracles::request_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| khived_oracles::request_decode(data));

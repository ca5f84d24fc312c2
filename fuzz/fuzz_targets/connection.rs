//! An arbitrary client byte stream through the real per-connection handler: well-formed
//! responses, then a close, never a panic or a hang. The check is `khived_oracles::connection`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| khived_oracles::connection(data));

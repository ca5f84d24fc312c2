//! Arbitrary bytes, in chunks the input chooses, through both of khived's frame readers:
//! `read_frame` and a `FrameDecoder` reading ahead as the daemon does. The check is
//! `khived_oracles::frame_reader`; it counts allocations, hence the global allocator.
#![no_main]

use khived_oracles::CountingAllocator;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fuzz_target!(|data: &[u8]| khived_oracles::frame_reader(data));

//! Fuzz target: arbitrary bytes into `sync_core::decode_records` with the
//! default limits. Must never panic; whatever decodes must survive
//! `encode_records` and decode again to the same records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_core::{BatchLimits, decode_records, encode_records};

fuzz_target!(|data: &[u8]| {
    // Raw bytes as the payload, and the same bytes lz4-wrapped so the
    // columnar decoder behind the lz4 layer is reached too.
    for payload in [data.to_vec(), sync_core::codec::compress(data)] {
        if let Ok(records) = decode_records(&payload, &BatchLimits::default()) {
            let again = decode_records(&encode_records(&records), &BatchLimits::default())
                .expect("re-encoded records must decode");
            assert_eq!(again, records, "records changed through encode/decode");
        }
    }
});

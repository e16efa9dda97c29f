//! The database server's certificate, as the channel binding reads it (src/db/tls.rs,
//! `end_point`): whatever a server sends in its handshake, before or without a check of it
//! (`sslmode=require`). Reading never panics, and a hash is given only for a certificate framed
//! whole by DER, with the length of one of the three hashes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use triggers::db::tls::end_point;

fuzz_target!(|data: &[u8]| {
    if let Some(hash) = end_point(data) {
        assert!(matches!(hash.len(), 32 | 48 | 64), "{}", hash.len());
        assert!(data.len() >= 2 && data[0] == 0x30);
    }
});

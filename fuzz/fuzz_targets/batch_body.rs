//! The batch body validator: any bytes. Never panics; an accepted envelope holds 1..1000 items;
//! every accepted item is an event as the single-event validator accepts it (its type and
//! payload validate again alone, unchanged).
#![no_main]

use std::cell::RefCell;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use triggers::ingress::events::{validate_batch, validate_event};
use triggers::json::Parser;

const PAYLOAD_MAX: usize = 4096;

thread_local! {
    static PARSER: RefCell<Parser> = RefCell::new(Parser::default());
}

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    PARSER.with(|parser| {
        let Ok(items) = validate_batch(parser, &body, PAYLOAD_MAX) else {
            return;
        };
        assert!((1..=1000).contains(&items.len()));
        for event in items.into_iter().flatten() {
            let chars = event.event_type.chars().count();
            assert!((1..=255).contains(&chars));
            assert!(event.payload.len() <= PAYLOAD_MAX);
            let mut alone = b"{\"type\":".to_vec();
            triggers::json::write_str(&mut alone, &event.event_type);
            alone.extend_from_slice(b",\"payload\":");
            alone.extend_from_slice(&event.payload);
            alone.push(b'}');
            let again = validate_event(parser, &Bytes::from(alone), PAYLOAD_MAX)
                .expect("an accepted item validates alone");
            assert_eq!(again.payload, event.payload);
            assert_eq!(again.event_type, event.event_type);
        }
    });
});

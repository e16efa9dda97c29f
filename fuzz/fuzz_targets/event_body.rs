//! The event body validator: any bytes. Never panics; what it accepts has a 1..255-character
//! type, a payload within the limit that is a slice of the body and valid JSON on its own. And the
//! JSON under it takes an object exactly when serde_json does (numbers of any size kept as their
//! text, as the server keeps a payload; past serde_json's 128 levels of nesting not compared).
#![no_main]

use std::cell::RefCell;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use triggers::ingress::events::validate_event;
use triggers::json::Parser;

const PAYLOAD_MAX: usize = 4096;

thread_local! {
    static PARSER: RefCell<Parser> = RefCell::new(Parser::default());
}

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    PARSER.with(|parser| {
        let ours = parser.borrow_mut().with_object(data, |_| ()).is_ok();
        let theirs = match serde_json::from_slice::<serde_json::Value>(data) {
            Ok(v) => Some(v.is_object()),
            Err(e) if e.to_string().starts_with("recursion limit exceeded") => None,
            Err(_) => Some(false),
        };
        if let Some(theirs) = theirs {
            assert_eq!(ours, theirs, "an object to serde_json: {theirs}, to us: {ours}");
        }
        let Ok(event) = validate_event(parser, &body, PAYLOAD_MAX) else {
            return;
        };
        let chars = event.event_type.chars().count();
        assert!((1..=255).contains(&chars));
        assert!(event.payload.len() <= PAYLOAD_MAX);
        assert!(
            data.windows(event.payload.len().max(1))
                .any(|w| w == &event.payload[..])
                || event.payload.is_empty(),
            "the payload is bytes of the body"
        );
        // The payload alone is valid JSON: wrapped as an object member it validates again.
        let mut wrapped = b"{\"type\":\"t\",\"payload\":".to_vec();
        wrapped.extend_from_slice(&event.payload);
        wrapped.push(b'}');
        let again = validate_event(parser, &Bytes::from(wrapped), PAYLOAD_MAX)
            .expect("a payload that validated validates alone");
        assert_eq!(again.payload, event.payload);
    });
});

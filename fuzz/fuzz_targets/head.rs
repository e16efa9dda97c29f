//! The request head: any bytes, arriving in two reads. Never panics; the incremental search for
//! the end of the head agrees with a search over the whole buffer and with httparse's own end.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use triggers::ingress::parse::{find_head_end, leading_blank_lines, parse_head, Parsed};

fuzz_target!(|data: &[u8]| {
    let Some((&split, wire)) = data.split_first() else {
        return;
    };
    let skip = leading_blank_lines(wire);
    let wire = &wire[skip..];
    let split = (split as usize * wire.len()) / 256;
    // What the connection does: search the first read, then only what came after it.
    let incremental = find_head_end(&wire[..split], 0).or_else(|| find_head_end(wire, split));
    assert_eq!(incremental, find_head_end(wire, 0), "incremental search");
    let mut buf = BytesMut::from(wire);
    match parse_head(&mut buf) {
        Ok(Parsed::Complete(head)) => {
            assert_eq!(Some(head.len), incremental, "httparse's end is the empty line");
            assert_eq!(buf.len(), wire.len() - head.len, "the head is split off");
            assert!(head.path.starts_with(b"/"));
        }
        Ok(Parsed::Partial) => assert_eq!(buf.len(), wire.len(), "nothing taken"),
        Err(_) => {}
    }
});

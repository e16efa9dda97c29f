//! Ids and timestamps: newtypes so the compiler catches mix-ups, a process-wide monotonic UUIDv7
//! generator, and RFC 3339 formatting with microseconds (PostgreSQL's precision, so a timestamp
//! written in a response reads back identical from the database).

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
        pub struct $name(pub Uuid);

        impl $name {
            /// The 16 bytes of the UUID.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }
    };
}

uuid_id!(
    /// An organization's id (UUIDv7 from its creation).
    OrgId
);
uuid_id!(
    /// An event's id: UUIDv7, strictly increasing within one process.
    EventId
);

/// The index of an ingress core, `0..ingress_cores`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CoreId(pub usize);

/// Microseconds since the Unix epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash, Default)]
pub struct Micros(pub i64);

impl Micros {
    /// The current wall-clock time.
    pub fn now() -> Micros {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Micros(d.as_micros() as i64)
    }

    /// As a `SystemTime`, for tokio-postgres parameters.
    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_micros(self.0.unsigned_abs())
        }
    }

    /// From a `SystemTime` read from the database.
    pub fn from_system_time(t: SystemTime) -> Micros {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Micros(d.as_micros() as i64),
            Err(e) => Micros(-(e.duration().as_micros() as i64)),
        }
    }

    /// Microseconds since 2000-01-01, PostgreSQL's binary timestamp encoding.
    pub fn to_pg_epoch(self) -> i64 {
        const PG_EPOCH_OFFSET_US: i64 = 946_684_800 * 1_000_000;
        self.0 - PG_EPOCH_OFFSET_US
    }

    /// `self` plus a duration.
    pub fn plus(self, d: Duration) -> Micros {
        Micros(self.0 + d.as_micros() as i64)
    }

    /// Write as RFC 3339 UTC with microseconds and `Z`, e.g. `2026-11-23T09:41:07.123456Z`.
    pub fn write_rfc3339(self, out: &mut Vec<u8>) {
        let secs = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000) as u32;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        let mut buf = *b"0000-00-00T00:00:00.000000Z";
        put_digits(&mut buf[0..4], y as u32);
        put_digits(&mut buf[5..7], m);
        put_digits(&mut buf[8..10], d);
        put_digits(&mut buf[11..13], sod / 3600);
        put_digits(&mut buf[14..16], sod / 60 % 60);
        put_digits(&mut buf[17..19], sod % 60);
        put_digits(&mut buf[20..26], micros);
        out.extend_from_slice(&buf);
    }

    /// The RFC 3339 form as a String.
    pub fn rfc3339(self) -> String {
        let mut v = Vec::with_capacity(27);
        self.write_rfc3339(&mut v);
        String::from_utf8(v).expect("RFC 3339 text is ASCII")
    }
}

fn put_digits(dst: &mut [u8], mut n: u32) {
    for b in dst.iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Format Unix seconds as an IMF-fixdate.
pub fn http_date(secs: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let rfc = Micros((secs as i64) * 1_000_000).rfc3339();
    let b = rfc.as_bytes();
    let month = ((b[5] - b'0') * 10 + (b[6] - b'0')) as usize;
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    out[..3].copy_from_slice(DAYS[((secs / 86_400) % 7) as usize]);
    out[5..7].copy_from_slice(&b[8..10]);
    out[8..11].copy_from_slice(MONTHS[month - 1]);
    out[12..16].copy_from_slice(&b[0..4]);
    out[17..25].copy_from_slice(&b[11..19]);
    out
}

/// The last (milliseconds << 20 | sequence) handed out by this process. One atomic for all cores
/// keeps ids strictly increasing process-wide, so two events created one after the other sort in
/// creation order whichever cores took them.
static LAST_ID_CLOCK: AtomicU64 = AtomicU64::new(0);

const SEQ_BITS: u32 = 20;

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    // A failed OS RNG leaves the seed to the clock: ids stay unique through the sequence counter.
    if getrandom::fill(&mut b).is_err() {
        b = (Micros::now().0 as u64).to_le_bytes();
    }
    u64::from_le_bytes(b) | 1
}

/// A fast non-cryptographic random u64 (wyrand), for the random tail of ids.
pub fn fast_random() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = (x as u128).wrapping_mul((x ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) ^ t) as u64
    })
}

/// A new UUIDv7: 48 bits of Unix milliseconds, then a 20-bit sequence (12 bits in `rand_a`, 8 at the
/// top of `rand_b`) that makes ids strictly increasing within the process, then 54 random bits.
/// No system call: the random tail comes from a per-thread generator seeded once.
pub fn new_v7(now: Micros) -> Uuid {
    let now_clock = ((now.0 / 1000) as u64) << SEQ_BITS;
    let mut prev = LAST_ID_CLOCK.load(Ordering::Relaxed);
    let clock = loop {
        let next = now_clock.max(prev + 1);
        match LAST_ID_CLOCK.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => break next,
            Err(actual) => prev = actual,
        }
    };
    let ms = clock >> SEQ_BITS;
    let seq = clock & ((1 << SEQ_BITS) - 1);
    let hi = (ms << 16) | 0x7000 | (seq >> 8);
    let lo = (0b10u64 << 62) | ((seq & 0xff) << 54) | (fast_random() >> 10);
    Uuid::from_u64_pair(hi, lo)
}

/// Parse an RFC 3339 time (`2026-01-31T12:00:00Z`, `…+02:00`, fractions allowed).
pub fn parse_rfc3339(text: &str) -> Option<Micros> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(Micros((t.unix_timestamp_nanos() / 1000) as i64))
}

/// Parse a path segment as a UUID (any version), hyphenated or simple form.
pub fn parse_uuid(text: &str) -> Option<Uuid> {
    if text.len() != 36 && text.len() != 32 {
        return None;
    }
    Uuid::try_parse(text).ok()
}

/// An inbox cursor: the last id of a page, as 22 characters of URL-safe base64. Opaque to clients.
pub fn encode_cursor(last: Uuid) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last.as_bytes())
}

/// The id inside a cursor from [`encode_cursor`].
pub fn decode_cursor(text: &str) -> Option<Uuid> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()?;
    Uuid::from_slice(&bytes).ok()
}

/// A cursor of a page ordered by (time, id) descending: the last item's, as 32 characters of
/// URL-safe base64 (the time's 8 bytes, then the id's 16). Opaque to clients.
pub fn encode_cursor_at(at: Micros, last: Uuid) -> String {
    use base64::Engine;
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&at.0.to_be_bytes());
    bytes[8..].copy_from_slice(last.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Times in a cursor are below 2^58 µs (the year 11,103): past the year 9999, the latest that
/// RFC 3339 writes, and still a timestamp PostgreSQL takes. So a cursor starts with `A` (its
/// first six bits are 0).
const CURSOR_MICROS_END: i64 = 1 << 58;

/// The time and id inside a cursor from [`encode_cursor_at`]; `None` also for a time before 1970
/// or from 2^58 µs on, which no page holds.
pub fn decode_cursor_at(text: &str) -> Option<(Micros, Uuid)> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()?;
    let bytes: [u8; 24] = bytes.try_into().ok()?;
    let at = i64::from_be_bytes(bytes[..8].try_into().ok()?);
    if !(0..CURSOR_MICROS_END).contains(&at) {
        return None;
    }
    Some((Micros(at), Uuid::from_slice(&bytes[8..]).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_and_id_cursor_reads_back_and_nothing_else_does() {
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        for at in [
            Micros(0),
            Micros(1_796_452_411_059_420),
            Micros(CURSOR_MICROS_END - 1),
        ] {
            let c = encode_cursor_at(at, id);
            assert_eq!(c.len(), 32);
            assert!(c.starts_with('A'), "{c}");
            assert_eq!(decode_cursor_at(&c), Some((at, id)));
        }
        for at in [
            Micros(-1),
            Micros(CURSOR_MICROS_END),
            Micros(i64::MAX),
            Micros(i64::MIN),
        ] {
            assert_eq!(decode_cursor_at(&encode_cursor_at(at, id)), None, "{at:?}");
        }
        assert_eq!(
            decode_cursor_at(&encode_cursor(id)),
            None,
            "an inbox cursor is not one"
        );
        assert_eq!(decode_cursor_at("%%%"), None);
        assert_eq!(decode_cursor_at(""), None);
    }

    #[test]
    fn dates_are_imf_fixdate() {
        assert_eq!(&http_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&http_date(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&http_date(1_795_000_000), b"Wed, 18 Nov 2026 11:06:40 GMT");
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let id = new_v7(Micros::now());
        let c = encode_cursor(id);
        assert_eq!(c.len(), 22);
        assert_eq!(decode_cursor(&c), Some(id));
        assert_eq!(decode_cursor("abc"), None);
        assert_eq!(decode_cursor("!!!!!!!!!!!!!!!!!!!!!!"), None);
    }

    #[test]
    fn rfc3339_parses_offsets_and_fractions() {
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:01Z"),
            Some(Micros(1_000_000))
        );
        assert_eq!(
            parse_rfc3339("1970-01-01T02:00:01.5+02:00"),
            Some(Micros(1_500_000))
        );
        let t = Micros(1_795_000_000_123_456);
        assert_eq!(parse_rfc3339(&t.rfc3339()), Some(t));
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
    }

    #[test]
    fn rfc3339_formats_utc_with_micros() {
        assert_eq!(Micros(0).rfc3339(), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            Micros(1_795_000_000_123_456).rfc3339(),
            "2026-11-18T11:06:40.123456Z"
        );
        // Leap day and end of year.
        assert_eq!(
            Micros(951_782_400_000_000).rfc3339(),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(
            Micros(1_735_689_599_999_999).rfc3339(),
            "2024-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn v7_ids_increase_strictly_and_carry_the_time() {
        let now = Micros::now();
        let mut prev = new_v7(now);
        for _ in 0..100_000 {
            let id = new_v7(now);
            assert!(id > prev, "{id} after {prev}");
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            prev = id;
        }
        let (secs, _) = prev.get_timestamp().unwrap().to_unix();
        assert!((secs as i64 - now.0 / 1_000_000).abs() <= 1);
    }

    #[test]
    fn v7_ids_increase_across_threads() {
        // Ids taken on different threads after each other still sort in creation order.
        let a = new_v7(Micros::now());
        let b = std::thread::spawn(|| new_v7(Micros::now())).join().unwrap();
        let c = new_v7(Micros::now());
        assert!(a < b && b < c);
    }

    #[test]
    fn v7_ids_do_not_go_back_with_the_clock() {
        let later = new_v7(Micros::now().plus(Duration::from_secs(1)));
        let earlier_clock = new_v7(Micros::now());
        assert!(earlier_clock > later);
    }

    #[test]
    fn parse_uuid_rejects_non_uuids() {
        assert!(parse_uuid("0190d5a0-0000-7000-8000-000000000000").is_some());
        assert!(parse_uuid("not-a-uuid").is_none());
        assert!(parse_uuid("0190d5a0-0000-7000-8000-00000000000g").is_none());
    }

    #[test]
    fn pg_epoch_offset() {
        assert_eq!(Micros(946_684_800_000_000).to_pg_epoch(), 0);
    }

    proptest::proptest! {
        #[test]
        fn any_cursor_round_trips(id in proptest::prelude::any::<u128>()) {
            let id = Uuid::from_u128(id);
            proptest::prop_assert_eq!(decode_cursor(&encode_cursor(id)), Some(id));
        }

        #[test]
        fn garbage_is_never_a_cursor_but_never_a_panic(text in ".{0,40}") {
            if let Some(id) = decode_cursor(&text) {
                proptest::prop_assert_eq!(text.len(), 22);
                proptest::prop_assert_eq!(encode_cursor(id), text);
            }
        }
    }
}

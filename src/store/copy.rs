//! PostgreSQL binary COPY encoding of event rows.
//!
//! Format: an 11-byte signature, flags and header-extension length (both 0), then per row a
//! 16-bit field count and each field as a 32-bit length (-1 for NULL) and its binary value, then a
//! 16-bit -1 trailer. `uuid` is its 16 bytes, `text` and `json` are UTF-8 bytes as they are,
//! `timestamptz` is microseconds since 2000-01-01 as a big-endian i64, `smallint` a big-endian
//! i16, and a one-dimensional `uuid[]` its header (dimensions, null flag, element type, length,
//! lower bound) and each element as a 16-byte field.

use bytes::{BufMut, BytesMut};

use crate::flow::event::NewEvent;

/// The columns the encoder writes, in order; the statement must list the same.
pub const COPY_EVENTS: &str =
    "COPY events (id, org_id, type, payload, status, endpoints, batch_id, \
     created_at) FROM STDIN (FORMAT binary)";

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
const FIELDS: i16 = 8;
/// The type oid of `uuid`, as array elements name it.
const UUID_OID: u32 = 2950;

/// What the writer stores of an event's delivery plan.
#[derive(Debug, Clone, Copy)]
pub struct RowPlan<'a> {
    /// The events table's status column (0 no endpoint, 3 derived from its deliveries).
    pub status: i16,
    /// The endpoints it matched (`None` when it matched none).
    pub endpoints: Option<&'a [uuid::Uuid]>,
    /// The delivery batch whose lease covers it.
    pub batch: Option<uuid::Uuid>,
}

/// Encodes rows into one buffer, reused batch after batch.
pub struct CopyEncoder {
    buf: BytesMut,
    rows: usize,
}

impl Default for CopyEncoder {
    fn default() -> Self {
        CopyEncoder {
            buf: BytesMut::with_capacity(64 * 1024),
            rows: 0,
        }
    }
}

impl CopyEncoder {
    /// Start a new COPY stream.
    pub fn begin(&mut self) {
        self.buf.clear();
        self.rows = 0;
        self.buf.put_slice(SIGNATURE);
        self.buf.put_i32(0);
        self.buf.put_i32(0);
    }

    /// Append one event with its delivery plan.
    pub fn row(&mut self, e: &NewEvent, plan: RowPlan<'_>) {
        let endpoints = plan.endpoints.map_or(0, |eps| 20 + eps.len() * 20);
        let needed = 2 + 8 * 4 + 16 + 16 + e.event_type.len() + e.payload.len() + 2;
        self.buf.reserve(needed + endpoints + 16 + 8);
        self.buf.put_i16(FIELDS);
        self.buf.put_i32(16);
        self.buf.put_slice(e.id.as_bytes());
        self.buf.put_i32(16);
        self.buf.put_slice(e.org.as_bytes());
        put_bytes(&mut self.buf, e.event_type.as_bytes());
        put_bytes(&mut self.buf, &e.payload);
        self.buf.put_i32(2);
        self.buf.put_i16(plan.status);
        match plan.endpoints {
            Some(eps) => {
                self.buf.put_i32((20 + eps.len() * 20) as i32);
                self.buf.put_i32(1); // dimensions
                self.buf.put_i32(0); // no NULL element
                self.buf.put_u32(UUID_OID);
                self.buf.put_i32(eps.len() as i32);
                self.buf.put_i32(1); // lower bound
                for id in eps {
                    self.buf.put_i32(16);
                    self.buf.put_slice(id.as_bytes());
                }
            }
            None => self.buf.put_i32(-1),
        }
        match plan.batch {
            Some(b) => {
                self.buf.put_i32(16);
                self.buf.put_slice(b.as_bytes());
            }
            None => self.buf.put_i32(-1),
        }
        self.buf.put_i32(8);
        self.buf.put_i64(e.created_at.to_pg_epoch());
        self.rows += 1;
    }

    /// Bytes encoded since `begin` or the last `take`.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Take what is encoded so far, to send it while more rows are encoded (so a batch of large
    /// payloads never sits in the encoder whole).
    pub fn take(&mut self) -> bytes::Bytes {
        self.buf.split().freeze()
    }

    /// Close the stream and take the rest of its bytes.
    pub fn finish(&mut self) -> bytes::Bytes {
        self.buf.put_i16(-1);
        self.buf.split().freeze()
    }

    /// Rows written since `begin`.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    buf.put_i32(b.len() as i32);
    buf.put_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{EventId, Micros, OrgId};
    use bytes::Bytes;
    use uuid::Uuid;

    #[test]
    fn encodes_header_rows_and_trailer() {
        let e = NewEvent {
            id: EventId(Uuid::from_u128(1)),
            org: OrgId(Uuid::from_u128(2)),
            event_type: "t".into(),
            payload: Bytes::from_static(b"{}"),
            dedup_id: None,
            created_at: Micros(946_684_800_000_001),
        };
        let none = RowPlan {
            status: 0,
            endpoints: None,
            batch: None,
        };
        let eps = [Uuid::from_u128(7)];
        let some = RowPlan {
            status: 3,
            endpoints: Some(&eps),
            batch: Some(Uuid::from_u128(9)),
        };
        let mut enc = CopyEncoder::default();
        enc.begin();
        enc.row(&e, none);
        enc.row(&e, some);
        assert_eq!(enc.rows(), 2);
        let out = enc.finish();
        let row_len = 2 + 4 + 16 + 4 + 16 + 4 + 1 + 4 + 2 + 4 + 2 + 4 + 4 + 4 + 8;
        assert_eq!(out.len(), 19 + row_len + (row_len + 40 + 16) + 2);
        assert_eq!(&out[..11], SIGNATURE);
        let row = &out[19..];
        assert_eq!(&row[..2], &8i16.to_be_bytes());
        assert_eq!(&row[2..6], &16i32.to_be_bytes());
        assert_eq!(&row[6..22], Uuid::from_u128(1).as_bytes());
        // type "t", payload "{}", status 0, endpoints NULL, batch NULL, created_at = 1 µs after
        // the PostgreSQL epoch.
        assert_eq!(&row[42..47], &[0, 0, 0, 1, b't']);
        assert_eq!(&row[47..53], &[0, 0, 0, 2, b'{', b'}']);
        assert_eq!(&row[53..59], &[0, 0, 0, 2, 0, 0]);
        assert_eq!(&row[59..63], &(-1i32).to_be_bytes());
        assert_eq!(&row[63..67], &(-1i32).to_be_bytes());
        assert_eq!(&row[67..79], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        // The second row's array: one dimension of one uuid, then the batch id.
        let second = &row[row_len..];
        assert_eq!(&second[53..59], &[0, 0, 0, 2, 0, 3]);
        assert_eq!(&second[59..63], &40i32.to_be_bytes());
        assert_eq!(&second[63..67], &1i32.to_be_bytes());
        assert_eq!(&second[71..75], &UUID_OID.to_be_bytes());
        assert_eq!(&second[75..79], &1i32.to_be_bytes());
        assert_eq!(&second[83..87], &16i32.to_be_bytes());
        assert_eq!(&second[87..103], Uuid::from_u128(7).as_bytes());
        assert_eq!(&second[103..107], &16i32.to_be_bytes());
        assert_eq!(&second[107..123], Uuid::from_u128(9).as_bytes());
        assert_eq!(&out[out.len() - 2..], &(-1i16).to_be_bytes());
        // The buffer is reusable.
        enc.begin();
        assert_eq!(enc.rows(), 0);
        // Taken in pieces, the stream is the same bytes.
        enc.row(&e, none);
        let mut pieces = enc.take().to_vec();
        enc.row(&e, some);
        pieces.extend_from_slice(&enc.finish());
        assert_eq!(pieces, out);
    }
}

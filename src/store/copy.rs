//! The binary COPY rows of `events` (the format is `db::copy`'s).

use crate::db::copy::BinaryRows;
use crate::flow::event::NewEvent;

/// The columns the encoder writes, in order; the statement must list the same.
pub const COPY_EVENTS: &str =
    "COPY events (id, org_id, type, payload, status, endpoints, batch_id, \
     created_at, traceparent) FROM STDIN (FORMAT binary)";

const FIELDS: i16 = 9;

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

/// Encodes event rows into one buffer, reused batch after batch.
#[derive(Default)]
pub struct CopyEncoder {
    rows: BinaryRows,
}

impl CopyEncoder {
    /// Start a new COPY stream.
    pub fn begin(&mut self) {
        self.rows.begin();
    }

    /// Append one event with its delivery plan.
    pub fn row(&mut self, e: &NewEvent, plan: RowPlan<'_>) {
        let endpoints = plan.endpoints.map_or(0, |eps| 20 + eps.len() * 20);
        let trace = e.traceparent.as_ref().map_or(0, |t| t.len());
        let size =
            9 * 4 + 16 * 3 + e.event_type.len() + e.payload.len() + 2 + 8 + endpoints + trace;
        self.rows
            .row(FIELDS, size)
            .uuid(&e.id.0)
            .uuid(&e.org.0)
            .bytes(e.event_type.as_bytes())
            .bytes(&e.payload)
            .i16(plan.status)
            .opt_uuids(plan.endpoints)
            .opt_uuid(plan.batch.as_ref())
            .time(e.created_at)
            .opt_text(e.traceparent.as_deref());
    }

    /// Bytes encoded since `begin` or the last `take`.
    pub fn pending_bytes(&self) -> usize {
        self.rows.pending_bytes()
    }

    /// Take what is encoded so far, to send it while more rows are encoded (so a batch of large
    /// payloads never sits in the encoder whole).
    pub fn take(&mut self) -> bytes::Bytes {
        self.rows.take()
    }

    /// Close the stream and take the rest of its bytes.
    pub fn finish(&mut self) -> bytes::Bytes {
        self.rows.finish()
    }

    /// Rows written since `begin`.
    pub fn rows(&self) -> usize {
        self.rows.rows()
    }
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
            traceparent: None,
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
        let row_len = 2 + 4 + 16 + 4 + 16 + 4 + 1 + 4 + 2 + 4 + 2 + 4 + 4 + 4 + 8 + 4;
        assert_eq!(out.len(), 19 + row_len + (row_len + 40 + 16) + 2);
        assert_eq!(&out[..11], b"PGCOPY\n\xff\r\n\0");
        let row = &out[19..];
        assert_eq!(&row[..2], &9i16.to_be_bytes());
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
        // No traceparent: NULL.
        assert_eq!(&row[79..83], &(-1i32).to_be_bytes());
        // The second row's array: one dimension of one uuid, then the batch id.
        let second = &row[row_len..];
        assert_eq!(&second[53..59], &[0, 0, 0, 2, 0, 3]);
        assert_eq!(&second[59..63], &40i32.to_be_bytes());
        assert_eq!(&second[63..67], &1i32.to_be_bytes());
        assert_eq!(&second[71..75], &2950u32.to_be_bytes());
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

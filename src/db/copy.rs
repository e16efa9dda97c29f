//! PostgreSQL's binary COPY format, for the stages that append rows in bulk (events, the attempt
//! log): an 11-byte signature, flags and header-extension length (both 0), then per row a 16-bit
//! field count and each field as a 32-bit length (-1 for NULL) and its binary value, then a 16-bit
//! -1 trailer. `uuid` is its 16 bytes, `text` and `json` their UTF-8 bytes, `int2`/`int4`/`int8`
//! big-endian, `timestamptz` microseconds since 2000-01-01 as a big-endian i64, and a
//! one-dimensional `uuid[]` its header (dimensions, null flag, element type, length, lower bound)
//! and each element as a 16-byte field.

use bytes::{BufMut, BytesMut};
use uuid::Uuid;

use crate::ids::Micros;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// The type oid of `uuid`, as array elements name it.
const UUID_OID: u32 = 2950;

/// Rows of one COPY stream, encoded into a buffer reused stream after stream.
pub struct BinaryRows {
    buf: BytesMut,
    rows: usize,
}

impl Default for BinaryRows {
    fn default() -> Self {
        BinaryRows {
            buf: BytesMut::with_capacity(64 * 1024),
            rows: 0,
        }
    }
}

impl BinaryRows {
    /// Start a new stream.
    pub fn begin(&mut self) {
        self.buf.clear();
        self.rows = 0;
        self.buf.put_slice(SIGNATURE);
        self.buf.put_i32(0);
        self.buf.put_i32(0);
    }

    /// Start a row of `fields` fields, with room for `bytes` more.
    pub fn row(&mut self, fields: i16, bytes: usize) -> &mut Self {
        self.buf.reserve(2 + bytes);
        self.buf.put_i16(fields);
        self.rows += 1;
        self
    }

    /// A `uuid`.
    pub fn uuid(&mut self, id: &Uuid) -> &mut Self {
        self.buf.put_i32(16);
        self.buf.put_slice(id.as_bytes());
        self
    }

    /// A `uuid` or NULL.
    pub fn opt_uuid(&mut self, id: Option<&Uuid>) -> &mut Self {
        match id {
            Some(id) => self.uuid(id),
            None => self.null(),
        }
    }

    /// `text` or `json` (its UTF-8 bytes).
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.put_i32(b.len() as i32);
        self.buf.put_slice(b);
        self
    }

    /// `text` or NULL.
    pub fn opt_text(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            Some(s) => self.bytes(s.as_bytes()),
            None => self.null(),
        }
    }

    /// An `int2`.
    pub fn i16(&mut self, v: i16) -> &mut Self {
        self.buf.put_i32(2);
        self.buf.put_i16(v);
        self
    }

    /// An `int2` or NULL.
    pub fn opt_i16(&mut self, v: Option<i16>) -> &mut Self {
        match v {
            Some(v) => self.i16(v),
            None => self.null(),
        }
    }

    /// An `int4`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.put_i32(4);
        self.buf.put_i32(v);
        self
    }

    /// A `timestamptz`.
    pub fn time(&mut self, t: Micros) -> &mut Self {
        self.buf.put_i32(8);
        self.buf.put_i64(t.to_pg_epoch());
        self
    }

    /// A one-dimensional `uuid[]` or NULL.
    pub fn opt_uuids(&mut self, ids: Option<&[Uuid]>) -> &mut Self {
        let Some(ids) = ids else {
            return self.null();
        };
        self.buf.put_i32((20 + ids.len() * 20) as i32);
        self.buf.put_i32(1); // dimensions
        self.buf.put_i32(0); // no NULL element
        self.buf.put_u32(UUID_OID);
        self.buf.put_i32(ids.len() as i32);
        self.buf.put_i32(1); // lower bound
        for id in ids {
            self.buf.put_i32(16);
            self.buf.put_slice(id.as_bytes());
        }
        self
    }

    /// NULL.
    pub fn null(&mut self) -> &mut Self {
        self.buf.put_i32(-1);
        self
    }

    /// Bytes encoded since `begin` or the last `take`.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Take what is encoded so far, to send it while more rows are encoded.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_signature_fields_nulls_and_trailer() {
        let mut r = BinaryRows::default();
        r.begin();
        r.row(4, 64)
            .uuid(&Uuid::from_u128(1))
            .opt_i16(None)
            .i32(7)
            .opt_uuids(Some(&[Uuid::from_u128(2)]));
        assert_eq!(r.rows(), 1);
        let out = r.finish();
        assert_eq!(&out[..11], SIGNATURE);
        let row = &out[19..];
        assert_eq!(&row[..2], &4i16.to_be_bytes());
        assert_eq!(&row[2..6], &16i32.to_be_bytes());
        assert_eq!(&row[22..26], &(-1i32).to_be_bytes());
        assert_eq!(&row[26..34], &[0, 0, 0, 4, 0, 0, 0, 7]);
        assert_eq!(&row[34..38], &40i32.to_be_bytes());
        assert_eq!(&row[46..50], &UUID_OID.to_be_bytes());
        assert_eq!(&out[out.len() - 2..], &(-1i16).to_be_bytes());
    }
}

//! The incremental `Transfer-Encoding: chunked` decoder of HTTP/1.1 bodies: the ingress reads
//! request bodies with it, delivery the answers of webhook receivers. Hostile input is expected
//! on both sides: sizes are checked against the room left under the limit (never summed), and
//! chunk metadata and trailers are bounded.

use bytes::{Buf, Bytes, BytesMut};

use crate::config::CHUNK_META_BYTES_MAX as CHUNK_META_MAX;

/// Why a chunked body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// The decoded body passed the limit: 413.
    TooLarge,
    /// Malformed chunk framing: 400.
    Malformed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

/// Incremental `Transfer-Encoding: chunked` decoder: feed it the read buffer as bytes arrive.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    body: BytesMut,
    limit: usize,
    announced: usize,
    trailer_bytes: usize,
}

impl ChunkedDecoder {
    /// A decoder refusing bodies over `limit` bytes.
    pub fn new(limit: usize) -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
            body: BytesMut::new(),
            limit,
            announced: 0,
            trailer_bytes: 0,
        }
    }

    /// Bytes the body may still grow by. The body never passes the limit, so this can't wrap.
    fn room(&self) -> u64 {
        debug_assert!(
            self.body.len() <= self.limit,
            "the body stays within its limit"
        );
        (self.limit - self.body.len()) as u64
    }

    /// Bytes of the chunks announced so far (received or not): what the body will hold.
    pub fn announced(&self) -> usize {
        self.announced
    }

    /// Consume what `buf` holds; `Ok(Some(body))` once the last chunk and trailers are in.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, ChunkError> {
        loop {
            match self.state {
                ChunkState::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        if size == 0 {
                            self.state = ChunkState::Trailer;
                        } else if size > self.room() {
                            // Compared against the room left, never as `len + size`: a chunk
                            // size near u64::MAX would wrap the sum past the check.
                            return Err(ChunkError::TooLarge);
                        } else {
                            // `size` fits the room left, so it fits a usize and the sum can't
                            // pass the limit.
                            self.announced += size as usize;
                            self.body.reserve(size as usize);
                            self.state = ChunkState::Data(size);
                        }
                    }
                    Ok(httparse::Status::Partial) if buf.len() < CHUNK_META_MAX => return Ok(None),
                    _ => return Err(ChunkError::Malformed),
                },
                ChunkState::Data(left) => {
                    let take = (left as usize).min(buf.len());
                    if take == 0 {
                        return Ok(None);
                    }
                    self.body.extend_from_slice(&buf[..take]);
                    buf.advance(take);
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkError::Malformed);
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailer => match buf.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                    }
                    Some(line) => {
                        // Trailer fields are allowed and ignored.
                        self.trailer_bytes += line + 2;
                        if self.trailer_bytes > CHUNK_META_MAX {
                            return Err(ChunkError::Malformed);
                        }
                        buf.advance(line + 2);
                    }
                    None if buf.len() + self.trailer_bytes < CHUNK_META_MAX => return Ok(None),
                    None => return Err(ChunkError::Malformed),
                },
                ChunkState::Done => return Ok(Some(std::mem::take(&mut self.body).freeze())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode_across_reads() {
        let wire = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        for split in 0..wire.len() {
            let mut d = ChunkedDecoder::new(100);
            let mut buf = BytesMut::from(&wire[..split]);
            let first = d.decode(&mut buf).unwrap();
            if let Some(body) = first {
                assert_eq!(&body[..], b"Wikipedia");
                continue;
            }
            buf.extend_from_slice(&wire[split..]);
            let body = d.decode(&mut buf).unwrap().expect("complete");
            assert_eq!(&body[..], b"Wikipedia", "split at {split}");
            assert_eq!(&buf[..], b"NEXT");
        }
    }

    #[test]
    fn chunked_limits_and_errors() {
        let mut d = ChunkedDecoder::new(8);
        assert_eq!(
            d.decode(&mut BytesMut::from("9\r\n")),
            Err(ChunkError::TooLarge)
        );
        let mut d = ChunkedDecoder::new(8);
        assert_eq!(
            d.decode(&mut BytesMut::from("zz\r\n")),
            Err(ChunkError::Malformed)
        );
        let mut d = ChunkedDecoder::new(8);
        assert_eq!(
            d.decode(&mut BytesMut::from("2\r\nabXY")),
            Err(ChunkError::Malformed)
        );
        let mut d = ChunkedDecoder::new(8);
        assert_eq!(
            d.decode(&mut BytesMut::from("5\r\nabcde\r\n4\r\n")),
            Err(ChunkError::TooLarge)
        );
    }

    #[test]
    fn chunk_sizes_near_u64_max_are_too_large_not_a_wrap() {
        // The hostile request of issue 8: one byte of body, then a chunk of 2^64 - 1 bytes.
        // `len + size` wraps to 0 and would pass a sum-based check, then `reserve` panics.
        for size in ["FFFFFFFFFFFFFFFF", "FFFFFFFFFFFFFFFE", "8000000000000000"] {
            let mut d = ChunkedDecoder::new(524_288);
            let wire = format!("1\r\na\r\n{size}\r\n");
            assert_eq!(
                d.decode(&mut BytesMut::from(wire.as_str())),
                Err(ChunkError::TooLarge),
                "{size}"
            );
        }
        // Exactly up to the limit is fine; one more byte is not.
        let mut d = ChunkedDecoder::new(3);
        let mut buf = BytesMut::from("1\r\na\r\n2\r\nbc\r\n0\r\n\r\n");
        assert_eq!(d.decode(&mut buf).unwrap().as_deref(), Some(&b"abc"[..]));
        let mut d = ChunkedDecoder::new(3);
        let mut buf = BytesMut::from("1\r\na\r\n3\r\n");
        assert_eq!(d.decode(&mut buf), Err(ChunkError::TooLarge));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn the_chunked_decoder_never_takes_more_than_its_limit(
                // A 0-size chunk ends the body, so every chunk before the last has a size.
                sizes in prop::collection::vec(1u64..5000, 1..10),
                limit in 0usize..8000,
            ) {
                let mut wire = Vec::new();
                for s in &sizes {
                    wire.extend_from_slice(format!("{s:x}\r\n").as_bytes());
                    wire.extend(std::iter::repeat_n(b'z', *s as usize));
                    wire.extend_from_slice(b"\r\n");
                }
                wire.extend_from_slice(b"0\r\n\r\n");
                let mut d = ChunkedDecoder::new(limit);
                let total: u64 = sizes.iter().sum();
                match d.decode(&mut BytesMut::from(&wire[..])) {
                    Ok(Some(body)) => {
                        prop_assert!(body.len() <= limit);
                        prop_assert_eq!(body.len() as u64, total);
                    }
                    Err(ChunkError::TooLarge) => {
                        prop_assert!(total > limit as u64);
                        prop_assert!(d.announced() <= limit);
                    }
                    other => prop_assert!(false, "{:?}", other),
                }
            }
        }
    }
}

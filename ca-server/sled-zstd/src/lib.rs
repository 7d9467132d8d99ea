//! The part of the `zstd` crate's 0.9 API that sled 0.34 calls when its `compression` feature
//! is on: `block::compress` for every page it writes, `stream::decode_all` for every page it
//! reads back, and `block::decompress` for its snapshot.
//!
//! The `zstd` crate makes a new compression or decompression context for each call. For pages
//! of a few hundred bytes that costs more than the compression itself: creating and sizing
//! the contexts took 16% of the CPU time of a store filled with 20,000 devices, and their
//! large short-lived allocations added kernel time (BENCHMARKS.md, "Store size"). These
//! functions keep one context of each kind per thread and write the same zstd frames, so a
//! store written by either reads with the other.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::io;

/// `ZSTD_CONTENTSIZE_UNKNOWN` and `ZSTD_CONTENTSIZE_ERROR` (zstd.h): the frame header gives
/// no usable size.
const CONTENT_SIZE_UNKNOWN: u64 = u64::MAX;
const CONTENT_SIZE_ERROR: u64 = u64::MAX - 1;

thread_local! {
    static CCTX: RefCell<zstd_safe::CCtx<'static>> = RefCell::new(zstd_safe::create_cctx());
    static DCTX: RefCell<zstd_safe::DCtx<'static>> = RefCell::new(zstd_safe::create_dctx());
}

fn zstd_error(code: usize) -> io::Error {
    io::Error::other(zstd_safe::get_error_name(code))
}

/// One-shot compression into a single frame.
pub mod block {
    use super::*;

    /// Compresses `data` into one zstd frame at `level`, with its content size in the header.
    pub fn compress(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; zstd_safe::compress_bound(data.len())];
        let written = CCTX.with(|ctx| {
            let mut ctx = ctx.borrow_mut();
            zstd_safe::compress_cctx(&mut ctx, &mut out, data, level).map_err(zstd_error)
        })?;
        out.truncate(written);
        Ok(out)
    }

    /// Decompresses one frame of at most `capacity` bytes.
    pub fn decompress(data: &[u8], capacity: usize) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; capacity];
        let written = DCTX.with(|ctx| {
            let mut ctx = ctx.borrow_mut();
            zstd_safe::decompress_dctx(&mut ctx, &mut out, data).map_err(zstd_error)
        })?;
        out.truncate(written);
        Ok(out)
    }
}

/// Decompression of everything a reader holds.
pub mod stream {
    use super::*;
    use std::io::Read;

    /// Reads `source` to its end and decompresses the frame it holds. sled's pages carry
    /// their content size (written by [`block::compress`]); a frame without one is refused.
    pub fn decode_all<R: Read>(mut source: R) -> io::Result<Vec<u8>> {
        let mut input = Vec::new();
        source.read_to_end(&mut input)?;
        match zstd_safe::get_frame_content_size(&input) {
            CONTENT_SIZE_UNKNOWN | CONTENT_SIZE_ERROR => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "zstd frame without a content size",
            )),
            size => {
                let size = usize::try_from(size)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
                block::decompress(&input, size)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_through_both_readers() {
        let page: Vec<u8> = (0..5000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for level in [1, 3, 10] {
            let frame = block::compress(&page, level).unwrap();
            assert!(frame.len() < page.len() / 2);
            assert_eq!(stream::decode_all(&frame[..]).unwrap(), page);
            assert_eq!(block::decompress(&frame, page.len()).unwrap(), page);
        }
        assert_eq!(
            stream::decode_all(&block::compress(&[], 3).unwrap()[..]).unwrap(),
            b""
        );
    }

    #[test]
    fn refuses_damaged_frames() {
        let frame = block::compress(b"a page of the store, a page of the store", 3).unwrap();
        assert!(stream::decode_all(&frame[..frame.len() - 1]).is_err());
        assert!(stream::decode_all(&b"not zstd"[..]).is_err());
        assert!(block::decompress(&frame, 4).is_err());
    }
}

//! Consensus diffs: the current consensus as one zstd frame compressed with
//! an older consensus as its prefix (zstd's "patch from"), so that what the
//! two share costs almost nothing. A fetcher that holds the older one gets
//! back the exact bytes the authorities signed and verifies them as it
//! would a full consensus; the diff itself is trusted for nothing.
//!
//! Without a base, the same frame is the consensus compressed alone.
//! Frames that are not zstd, that use a window larger than [`WINDOW_LOG`],
//! or that would decompress to more than the caller's limit are refused
//! without allocating more than that limit.

use sha2::{Digest, Sha256};
use zstd_safe::{CCtx, CParameter, DCtx, DParameter};

/// Consensuses an authority keeps diffs from (the current one's
/// predecessors).
pub const KEEP: usize = 8;
/// Compression level: diffs are made once per consensus and base.
pub const LEVEL: i32 = 19;
/// Window of a frame, log2 bytes: enough to reach back over a base and a
/// consensus of the largest allowed size (28 MiB each).
pub const WINDOW_LOG: u32 = 26;

/// The SHA-256 of a consensus' bytes, which names it as a base.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `new` compressed against `base` (or alone), at [`LEVEL`].
pub fn encode(base: Option<&[u8]>, new: &[u8]) -> Result<Vec<u8>, String> {
    encode_at(LEVEL, base, new)
}

/// `new` compressed against `base` (or alone), at zstd level `level`.
pub fn encode_at(level: i32, base: Option<&[u8]>, new: &[u8]) -> Result<Vec<u8>, String> {
    // zstd ignores a prefix in the input's own memory, and the answer to
    // a fetcher that already holds the consensus would be all of it again:
    // such a base is referenced from a copy.
    let copy;
    let base = match base {
        Some(b) if overlap(b, new) => {
            copy = b.to_vec();
            Some(copy.as_slice())
        }
        b => b,
    };
    let e = |c: usize| zstd_safe::get_error_name(c).to_string();
    let mut cx = CCtx::create();
    cx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(e)?;
    cx.set_parameter(CParameter::WindowLog(WINDOW_LOG))
        .map_err(e)?;
    cx.set_parameter(CParameter::EnableLongDistanceMatching(true))
        .map_err(e)?;
    cx.set_parameter(CParameter::ChecksumFlag(true))
        .map_err(e)?;
    if let Some(b) = base {
        cx.ref_prefix(b).map_err(e)?;
    }
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(new.len()));
    cx.compress2(&mut out, new).map_err(e)?;
    Ok(out)
}

/// Whether two slices share any memory.
fn overlap(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (a.as_ptr_range(), b.as_ptr_range());
    a.start < b.end && b.start < a.end
}

/// The bytes `diff` encodes against `base` (or alone), if at most `max`.
pub fn decode(base: Option<&[u8]>, diff: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let e = |c: usize| format!("bad diff: {}", zstd_safe::get_error_name(c));
    let mut dx = DCtx::create();
    dx.set_parameter(DParameter::WindowLogMax(WINDOW_LOG))
        .map_err(e)?;
    if let Some(b) = base {
        dx.ref_prefix(b).map_err(e)?;
    }
    // What the frame says it holds, if it says so, and never over `max`:
    // the output cannot grow past its capacity.
    let cap = match zstd_safe::get_frame_content_size(diff) {
        Ok(Some(n)) if n > max as u64 => return Err(format!("bad diff: over {max} bytes")),
        Ok(Some(n)) => n as usize,
        _ => max,
    };
    let mut out = Vec::with_capacity(cap);
    dx.decompress(&mut out, diff).map_err(e)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2,000 records of 200 bytes; `churn` of them changed.
    fn doc(seed: u8, churn: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..2000u32 {
            let mut rec = [0u8; 200];
            let changed = (i as usize) < churn;
            for (j, b) in rec.iter_mut().enumerate() {
                let x = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(j as u32 * 40_503);
                *b = (x >> 13) as u8 ^ if changed { seed } else { 0 };
            }
            out.extend_from_slice(&rec);
        }
        out
    }

    #[test]
    fn a_diff_rebuilds_the_exact_bytes_and_is_small() {
        let (old, new) = (doc(1, 0), doc(7, 20));
        let d = encode(Some(&old), &new).unwrap();
        assert_eq!(decode(Some(&old), &d, new.len()).unwrap(), new);
        let alone = encode(None, &new).unwrap();
        assert_eq!(decode(None, &alone, new.len()).unwrap(), new);
        // 1% of the records changed: the diff is a few percent of the whole.
        assert!(d.len() * 20 < new.len(), "{} of {}", d.len(), new.len());
        assert!(d.len() < alone.len() / 5, "{} vs {}", d.len(), alone.len());
    }

    #[test]
    fn wrong_bases_lies_and_bombs_are_refused() {
        let (old, new) = (doc(1, 0), doc(7, 20));
        let d = encode(Some(&old), &new).unwrap();
        // Another base: the checksum fails (or the frame does not decode).
        assert!(decode(Some(&doc(3, 100)), &d, new.len()).is_err());
        assert!(decode(None, &d, new.len()).is_err());
        // One byte short of the output: refused, not grown.
        assert!(decode(Some(&old), &d, new.len() - 1).is_err());
        let mut bad = d.clone();
        let n = bad.len();
        bad[n / 2] ^= 0x40;
        assert!(decode(Some(&old), &bad, new.len()).is_err());
        assert!(decode(None, b"not zstd at all", 1 << 20).is_err());
        // 64 MiB of zeros compress to a few KiB: refused at the limit.
        let bomb = encode(None, &vec![0u8; 64 << 20]).unwrap();
        assert!(bomb.len() < 64 << 10);
        assert!(decode(None, &bomb, 4 << 20).is_err());
    }
}

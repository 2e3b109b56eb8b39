//! Reading and writing NumPy `.npy` files (format versions 1–3).
//!
//! Written here rather than taken from a crate because the CLI's contract is its error messages:
//! every way a file can be wrong (dtype, Fortran order, rank, truncation, a broken header) must
//! name the file and say what was expected.

use std::fs;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Element type of an array on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bool,
    U8,
    I64,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bool | Dtype::U8 => 1,
            Dtype::I64 => 8,
        }
    }
}

/// A parsed array: shape, dtype and the raw little-endian payload.
#[derive(Debug, Clone)]
pub struct RawArray {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub data: Vec<u8>,
}

fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header.find(&format!("'{key}'"))?;
    let rest = &header[pos + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

fn parse_header(header: &str) -> Result<(String, bool, Vec<usize>)> {
    let descr = header_value(header, "descr").context("header has no 'descr'")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|s| s.split('\'').next())
        .context("'descr' is not a quoted string")?
        .to_string();
    let fortran = header_value(header, "fortran_order").context("header has no 'fortran_order'")?;
    let fortran = if fortran.starts_with("True") {
        true
    } else if fortran.starts_with("False") {
        false
    } else {
        bail!("'fortran_order' is neither True nor False");
    };
    let shape = header_value(header, "shape").context("header has no 'shape'")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .context("'shape' is not a tuple")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .with_context(|| format!("bad shape entry `{s}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((descr, fortran, shape))
}

/// Where the payload starts and what it holds, from a header alone.
struct Header {
    shape: Vec<usize>,
    dtype: Dtype,
    /// Offset of the payload in the file.
    data_start: usize,
    /// Bytes the payload must have (checked: a shape whose size overflows is refused).
    data_len: usize,
}

/// The fixed prefix: magic, version and header length. Returns (header length, its offset).
fn parse_prefix(bytes: &[u8]) -> Result<(usize, usize)> {
    ensure!(
        bytes.len() >= 10 && bytes.starts_with(MAGIC),
        "not a .npy file (missing the \\x93NUMPY magic)"
    );
    match bytes[6] {
        1 => Ok((u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)),
        2 | 3 => {
            ensure!(bytes.len() >= 12, "truncated .npy header");
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            Ok((len as usize, 12))
        }
        v => bail!("unsupported .npy format version {v}"),
    }
}

/// Parses the header text that follows the prefix.
fn parse_header_text(header: &[u8], data_start: usize) -> Result<Header> {
    let header = std::str::from_utf8(header).context("the .npy header is not text")?;
    let (descr, fortran, shape) =
        parse_header(header).with_context(|| format!("corrupt .npy header `{}`", header.trim()))?;
    let dtype = match descr.as_str() {
        "<f4" => Dtype::F32,
        "|b1" => Dtype::Bool,
        "|u1" => Dtype::U8,
        "<i8" => Dtype::I64,
        other => bail!(
            "unsupported dtype `{other}`: tensors must be little-endian float32 (`<f4`), masks \
             float32, bool, uint8 or int64"
        ),
    };
    ensure!(
        !fortran,
        "array is in Fortran (column-major) order; save it in C order (np.ascontiguousarray)"
    );
    let data_len = shape
        .iter()
        .try_fold(dtype.size(), |acc, &s| acc.checked_mul(s))
        .filter(|&len| len <= isize::MAX as usize)
        .with_context(|| {
            format!("shape {shape:?} declares more data than any file can hold (corrupt header)")
        })?;
    Ok(Header {
        shape,
        dtype,
        data_start,
        data_len,
    })
}

/// Parses `.npy` bytes.
pub fn parse(bytes: &[u8]) -> Result<RawArray> {
    let (header_len, start) = parse_prefix(bytes)?;
    ensure!(
        bytes.len() >= start + header_len,
        "truncated .npy header ({} bytes, header says {})",
        bytes.len(),
        start + header_len
    );
    let h = parse_header_text(&bytes[start..start + header_len], start + header_len)?;
    let data = &bytes[h.data_start..];
    check_payload_len(&h, data.len() as u64)?;
    Ok(RawArray {
        shape: h.shape,
        dtype: h.dtype,
        data: data.to_vec(),
    })
}

fn check_payload_len(h: &Header, actual: u64) -> Result<()> {
    ensure!(
        actual == h.data_len as u64,
        "payload has {actual} bytes but shape {:?} of {:?} needs {} (truncated or corrupt file)",
        h.shape,
        h.dtype,
        h.data_len
    );
    Ok(())
}

/// Reads a file's header first, checks the size it declares against the file's size and the
/// memory available, and only then reads the payload: a corrupt or hostile header can neither
/// make the reader allocate more than the file holds nor abort in the allocator.
fn read(path: &Path) -> Result<RawArray> {
    let read = || -> Result<RawArray> {
        let mut file = fs::File::open(path).context("cannot read it")?;
        let file_len = file.metadata().context("cannot stat it")?.len();
        let mut prefix = Vec::with_capacity(12);
        (&mut file)
            .take(12)
            .read_to_end(&mut prefix)
            .context("cannot read it")?;
        let (header_len, start) = parse_prefix(&prefix)?;
        ensure!(
            file_len >= (start + header_len) as u64,
            "truncated .npy header ({file_len} bytes, header says {})",
            start + header_len
        );
        let mut header = prefix.split_off(start);
        header.reserve_exact(header_len.saturating_sub(header.len()));
        (&mut file)
            .take((header_len - header.len()) as u64)
            .read_to_end(&mut header)
            .context("cannot read its header")?;
        header.truncate(header_len);
        let h = parse_header_text(&header, start + header_len)?;
        check_payload_len(&h, file_len - h.data_start as u64)?;
        // The payload is read once and converted once: budget for both copies.
        crate::limits::check_memory(2 * h.data_len as u128, "reading this array")?;
        let mut data = Vec::with_capacity(h.data_len);
        file.read_to_end(&mut data)
            .context("cannot read its data")?;
        check_payload_len(&h, data.len() as u64)?;
        Ok(RawArray {
            shape: h.shape,
            dtype: h.dtype,
            data,
        })
    };
    read().with_context(|| format!("{}", path.display()))
}

impl RawArray {
    /// The values as float32, if the array is float32 of the given rank.
    pub fn into_f32(self, rank: usize, what: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        ensure!(
            self.dtype == Dtype::F32,
            "{what} must be float32 (`<f4`), got {:?}",
            self.dtype
        );
        ensure!(
            self.shape.len() == rank,
            "{what} must have rank {rank}, got shape {:?}",
            self.shape
        );
        let data = self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((data, self.shape))
    }

    /// The values as a 2-D keep mask (1 = keep, 0 = drop) from bool, uint8, int64 or float32.
    pub fn into_mask(self, what: &str) -> Result<(Vec<bool>, Vec<usize>)> {
        ensure!(
            self.shape.len() == 2,
            "{what} must have rank 2 [batch, n], got shape {:?}",
            self.shape
        );
        let values: Vec<f64> = match self.dtype {
            Dtype::Bool | Dtype::U8 => self.data.iter().map(|b| *b as f64).collect(),
            Dtype::I64 => self
                .data
                .chunks_exact(8)
                .map(|c| {
                    i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64
                })
                .collect(),
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
        };
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| **v != 0.0 && **v != 1.0)
        {
            bail!(
                "{what} values must be 0 (drop) or 1 (keep), found {v} at flat index {i} \
                 (additive masks such as -inf/-10000 are not accepted)"
            );
        }
        Ok((values.into_iter().map(|v| v == 1.0).collect(), self.shape))
    }
}

/// Reads a float32 tensor of the given rank.
pub fn read_f32(path: &Path, rank: usize, what: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    read(path)?
        .into_f32(rank, what)
        .with_context(|| format!("{}", path.display()))
}

/// Reads a 2-D mask (1 = keep, 0 = drop) of dtype bool, uint8, int64 or float32.
pub fn read_mask(path: &Path, what: &str) -> Result<(Vec<bool>, Vec<usize>)> {
    read(path)?
        .into_mask(what)
        .with_context(|| format!("{}", path.display()))
}

/// Encodes a float32 array as `.npy` (version 1, C order).
pub fn encode_f32(data: &[f32], shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Version 1 stores the header length in 2 bytes; only absurd ranks need version 2's 4.
    let version: u8 = if header.len() + 64 <= u16::MAX as usize {
        1
    } else {
        2
    };
    let prefix = MAGIC.len() + if version == 1 { 4 } else { 6 };
    // Pad so that the payload starts on a 64-byte boundary, newline-terminated.
    let unpadded = prefix + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(prefix + header.len() + 4 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Writes a float32 array as `.npy`.
pub fn write_f32(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(&encode_f32(data, shape))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(header: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn f32_round_trip_any_rank() {
        for shape in [vec![3], vec![2, 3], vec![1, 2, 3, 4], vec![]] {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
            let bytes = encode_f32(&data, &shape);
            assert_eq!(
                bytes.len() % 64,
                (4 * n) % 64,
                "payload aligned to 64 bytes"
            );
            let a = parse(&bytes).unwrap();
            assert_eq!(a.shape, shape);
            assert_eq!(a.dtype, Dtype::F32);
            let back: Vec<f32> = a
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(back, data);
        }
    }

    #[test]
    fn parses_numpy_written_headers_and_rejects_bad_ones() {
        let ok = with_header(
            "{'descr': '|b1', 'fortran_order': False, 'shape': (2, 2), }          \n",
            &[1, 0, 1, 1],
        );
        let a = parse(&ok).unwrap();
        assert_eq!((a.dtype, a.shape), (Dtype::Bool, vec![2, 2]));

        let cases: [(&str, &[u8], &str); 6] = [
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }\n",
                &[0; 8],
                "unsupported dtype `<f8`",
            ),
            (
                "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }\n",
                &[0; 4],
                "unsupported dtype `>f4`",
            ),
            (
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }\n",
                &[0; 16],
                "Fortran",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }\n",
                &[0; 15],
                "truncated or corrupt",
            ),
            (
                "{'descr': '<f4', 'shape': (2, 2), }\n",
                &[0; 16],
                "no 'fortran_order'",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }\n",
                &[0; 16],
                "bad shape entry",
            ),
        ];
        for (header, payload, want) in cases {
            let err = format!("{:#}", parse(&with_header(header, payload)).unwrap_err());
            assert!(err.contains(want), "{header}: {err}");
        }
        assert!(format!("{:#}", parse(b"garbage!!!!!").unwrap_err()).contains("magic"));
        let mut short = with_header(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }\n",
            &[0; 4],
        );
        short.truncate(20);
        assert!(format!("{:#}", parse(&short).unwrap_err()).contains("truncated"));
    }

    #[test]
    fn a_shape_whose_size_overflows_is_refused_not_wrapped() {
        // 2^62 * 4 float32 = 2^66 bytes: wraps to 0 in usize arithmetic, and the empty payload
        // would then "match".
        let header = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, 4), }}\n",
            1u64 << 62
        );
        let err = format!("{:#}", parse(&with_header(&header, &[])).unwrap_err());
        assert!(
            err.contains("declares more data than any file can hold"),
            "{err}"
        );
    }

    #[test]
    fn files_are_checked_against_their_header_before_the_payload_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        write_f32(&path, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 2, 3]).unwrap();
        let (data, shape) = read_f32(&path, 3, "x").unwrap();
        assert_eq!((data.len(), shape), (6, vec![1, 2, 3]));
        let err = format!("{:#}", read_f32(&path, 4, "q").unwrap_err());
        assert!(
            err.contains("a.npy") && err.contains("q must have rank 4"),
            "{err}"
        );

        // A header that declares a terabyte in a file of a few bytes: refused from the header.
        let huge = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }\n";
        fs::write(&path, with_header(huge, &[0; 16])).unwrap();
        let err = format!("{:#}", read_f32(&path, 2, "q").unwrap_err());
        assert!(
            err.contains("payload has 16 bytes") && err.contains("4000000000000"),
            "{err}"
        );

        let mut short = encode_f32(&[1.0; 8], &[8]);
        short.truncate(30);
        fs::write(&path, short).unwrap();
        let err = format!("{:#}", read_f32(&path, 1, "x").unwrap_err());
        assert!(err.contains("truncated .npy header"), "{err}");

        let err = format!(
            "{:#}",
            read_f32(&dir.path().join("none.npy"), 1, "x").unwrap_err()
        );
        assert!(err.contains("none.npy: cannot read it"), "{err}");
    }

    #[test]
    fn masks_accept_four_dtypes_and_refuse_additive_values() {
        for (descr, payload) in [
            ("|b1", vec![1u8, 0]),
            ("|u1", vec![1, 0]),
            ("<i8", [1i64.to_le_bytes(), 0i64.to_le_bytes()].concat()),
            ("<f4", [1f32.to_le_bytes(), 0f32.to_le_bytes()].concat()),
        ] {
            let header =
                format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (1, 2), }}\n");
            let (mask, shape) = parse(&with_header(&header, &payload))
                .unwrap()
                .into_mask("m")
                .unwrap();
            assert_eq!((mask, shape), (vec![true, false], vec![1, 2]), "{descr}");
        }
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }\n";
        let payload = [0f32.to_le_bytes(), (-1e4f32).to_le_bytes()].concat();
        let err = format!(
            "{:#}",
            parse(&with_header(header, &payload))
                .unwrap()
                .into_mask("m")
                .unwrap_err()
        );
        assert!(err.contains("additive masks"), "{err}");
    }

    #[test]
    fn a_rank_too_long_for_version_1_is_written_as_version_2() {
        let shape = vec![1usize; 30_000];
        let bytes = encode_f32(&[7.0], &shape);
        assert_eq!(bytes[6], 2);
        let (data, back) = parse(&bytes).unwrap().into_f32(shape.len(), "x").unwrap();
        assert_eq!((data, back), (vec![7.0], shape));
    }
}

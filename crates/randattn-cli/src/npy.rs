//! Reading and writing NumPy `.npy` files (format versions 1–3).
//!
//! Written here rather than taken from a crate because the CLI's contract is its error messages:
//! every way a file can be wrong (dtype, Fortran order, rank, truncation, a broken header) must
//! name the file and say what was expected.

use std::fs;
use std::io::Write;
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

/// Parses `.npy` bytes.
pub fn parse(bytes: &[u8]) -> Result<RawArray> {
    ensure!(
        bytes.len() >= 10 && bytes.starts_with(MAGIC),
        "not a .npy file (missing the \\x93NUMPY magic)"
    );
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            ensure!(bytes.len() >= 12, "truncated .npy header");
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => bail!("unsupported .npy format version {v}"),
    };
    ensure!(
        bytes.len() >= start + header_len,
        "truncated .npy header ({} bytes, header says {})",
        bytes.len(),
        start + header_len
    );
    let header = std::str::from_utf8(&bytes[start..start + header_len])
        .context("the .npy header is not text")?;
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
    let count: usize = shape.iter().product();
    let data = &bytes[start + header_len..];
    ensure!(
        data.len() == count * dtype.size(),
        "payload has {} bytes but shape {shape:?} of `{descr}` needs {} (truncated or corrupt file)",
        data.len(),
        count * dtype.size()
    );
    Ok(RawArray {
        shape,
        dtype,
        data: data.to_vec(),
    })
}

fn read(path: &Path) -> Result<RawArray> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{}", path.display()))
}

/// Reads a float32 tensor of the given rank.
pub fn read_f32(path: &Path, rank: usize, what: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let a = read(path)?;
    ensure!(
        a.dtype == Dtype::F32,
        "{}: {what} must be float32 (`<f4`), got {:?}",
        path.display(),
        a.dtype
    );
    ensure!(
        a.shape.len() == rank,
        "{}: {what} must have rank {rank}, got shape {:?}",
        path.display(),
        a.shape
    );
    let data = a
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((data, a.shape))
}

/// Reads a 2-D mask (1 = keep, 0 = drop) of dtype bool, uint8, int64 or float32.
pub fn read_mask(path: &Path, what: &str) -> Result<(Vec<bool>, Vec<usize>)> {
    let a = read(path)?;
    ensure!(
        a.shape.len() == 2,
        "{}: {what} must have rank 2 [batch, n], got shape {:?}",
        path.display(),
        a.shape
    );
    let values: Vec<f64> = match a.dtype {
        Dtype::Bool | Dtype::U8 => a.data.iter().map(|b| *b as f64).collect(),
        Dtype::I64 => a
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64)
            .collect(),
        Dtype::F32 => a
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
            "{}: {what} values must be 0 (drop) or 1 (keep), found {v} at flat index {i} \
             (additive masks such as -inf/-10000 are not accepted)",
            path.display()
        );
    }
    Ok((values.into_iter().map(|v| v == 1.0).collect(), a.shape))
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
    // Pad so that the payload starts on a 64-byte boundary, newline-terminated.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
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
}

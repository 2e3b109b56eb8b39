//! Shapes, validated input views and masks.
//!
//! Every estimator takes the same [`AttentionInputs`]: Q `[batch, heads, n_q, d]`,
//! K `[batch, heads, n_k, d]`, V `[batch, heads, n_k, d_v]`, all row-major contiguous f32, an
//! optional key-padding mask `[batch, n_k]` and an optional query mask `[batch, n_q]`
//! (`true` = keep). Construction validates everything once (shapes, emptiness, finiteness), so
//! kernels can index without further checks.

use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef, matmul};

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dims {
    /// Batch size.
    pub batch: usize,
    /// Number of heads.
    pub heads: usize,
    /// Number of query rows per head.
    pub n_q: usize,
    /// Number of key/value rows per head.
    pub n_k: usize,
    /// Query/key feature dimension.
    pub d: usize,
    /// Value feature dimension (may differ from `d`).
    pub d_v: usize,
}

impl Dims {
    /// Shape of Q.
    pub fn q_shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.n_q, self.d]
    }
    /// Shape of K.
    pub fn k_shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.n_k, self.d]
    }
    /// Shape of V.
    pub fn v_shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.n_k, self.d_v]
    }
    /// Shape of the output (and of the output gradient).
    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.n_q, self.d_v]
    }
    /// Number of (batch, head) pairs.
    pub fn batch_heads(&self) -> usize {
        self.batch * self.heads
    }
    /// Number of elements of the output.
    pub fn out_len(&self) -> usize {
        self.out_shape().iter().product()
    }
}

/// Validated, borrowed inputs of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionInputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dims: Dims,
    key_mask: Option<&'a [bool]>,
    query_mask: Option<&'a [bool]>,
    projection: Option<ValueProjection<'a>>,
}

/// The layer input and value projection behind V, `V = X·W_V + b_V` (what MCA samples):
/// X `[batch, n_k, d_model]`, W_V `[d_model, heads·d_v]` (head `h` = columns `h·d_v..(h+1)·d_v`),
/// optional b_V `[heads·d_v]`. Validated by [`AttentionInputs::with_value_projection`].
#[derive(Debug, Clone, Copy)]
pub struct ValueProjection<'a> {
    /// X, row-major `[batch, n_k, d_model]`.
    pub x: &'a [f32],
    /// W_V, row-major `[d_model, heads·d_v]`.
    pub wv: &'a [f32],
    /// b_V, `[heads·d_v]`, if any.
    pub bv: Option<&'a [f32]>,
    /// The input feature dimension.
    pub d_model: usize,
}

/// `V = X·W_V + b_V` split into heads, `[batch, heads, n, d_v]`, from X `[batch, n, d_model]`,
/// W_V `[d_model, heads·d_v]` (`wv.len() / d_model` columns) and an optional b_V: the values a
/// model's value projection gives (for inputs that come as a layer input and weights).
pub fn project_values(
    x: &[f32],
    x_shape: [usize; 3],
    wv: &[f32],
    bv: Option<&[f32]>,
    heads: usize,
) -> Result<Vec<f32>> {
    check_len("x", x.len(), &x_shape)?;
    let [batch, n, d_model] = x_shape;
    let cols = wv.len() / d_model;
    if heads == 0 || wv.len() != d_model * cols || cols == 0 || !cols.is_multiple_of(heads) {
        return Err(Error::shape(
            "wv",
            format!(
                "has {} elements, not [d_model, heads·d_v] with d_model = {d_model} (from x) and a multiple of {heads} heads",
                wv.len()
            ),
        ));
    }
    if let Some(b) = bv
        && b.len() != cols
    {
        return Err(Error::shape(
            "bv",
            format!(
                "has {} elements but must be [heads·d_v] = [{cols}]",
                b.len()
            ),
        ));
    }
    let d_v = cols / heads;
    let mut flat = vec![0.0f32; batch * n * cols];
    matmul(
        MatMut::new(&mut flat, batch * n, cols),
        false,
        MatRef::new(x, batch * n, d_model),
        MatRef::new(wv, d_model, cols),
        1.0,
    );
    let mut v = vec![0.0f32; batch * n * cols];
    for b in 0..batch {
        for j in 0..n {
            let row = &flat[(b * n + j) * cols..(b * n + j + 1) * cols];
            for h in 0..heads {
                let at = ((b * heads + h) * n + j) * d_v;
                for (c, o) in v[at..at + d_v].iter_mut().enumerate() {
                    *o = row[h * d_v + c] + bv.map_or(0.0, |bb| bb[h * d_v + c]);
                }
            }
        }
    }
    Ok(v)
}

fn check_len(arg: &'static str, data_len: usize, shape: &[usize]) -> Result<()> {
    let want = shape
        .iter()
        .try_fold(1usize, |acc, s| acc.checked_mul(*s))
        .ok_or_else(|| Error::shape(arg, format!("has shape {shape:?}, too large to address")))?;
    if data_len != want {
        return Err(Error::shape(
            arg,
            format!("has {data_len} elements but its shape {shape:?} needs {want}"),
        ));
    }
    if let Some(axis) = shape.iter().position(|&s| s == 0) {
        return Err(Error::shape(
            arg,
            format!("has shape {shape:?} with an empty axis {axis}; every axis must be at least 1"),
        ));
    }
    Ok(())
}

/// Whether every value of `data` is finite: a sum of `x * 0` is NaN iff some `x` is NaN or
/// ±Inf; chunked so that it vectorises.
fn all_finite(data: &[f32]) -> bool {
    let mut acc = [0.0f32; 16];
    let chunks = data.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += *x * 0.0;
        }
    }
    let mut tail = 0.0f32;
    for x in rest {
        tail += *x * 0.0;
    }
    acc.iter().sum::<f32>() + tail == 0.0
}

/// Returns an error naming the first NaN or ±Inf in `data`.
pub fn check_finite(arg: &'static str, data: &[f32]) -> Result<()> {
    // Large inputs are scanned in parallel: the scan is memory-bound, and at n = 4096
    // (B·H = 8, d = 64) one thread spent about 1 ms on Q, K and V — a quarter of Nyström's
    // forward (measured through the Python binding, which validates on every call).
    const CHUNK: usize = 1 << 16;
    let finite = if data.len() >= 4 * CHUNK {
        use rayon::prelude::*;
        data.par_chunks(CHUNK).all(all_finite)
    } else {
        all_finite(data)
    };
    if finite {
        return Ok(());
    }
    let (index, &value) = data
        .iter()
        .enumerate()
        .find(|(_, x)| !x.is_finite())
        .expect("a non-finite element exists");
    Err(Error::NonFinite { arg, index, value })
}

impl<'a> AttentionInputs<'a> {
    /// Validates and wraps Q, K and V with their shapes.
    ///
    /// Errors when a slice's length does not match its shape, when any axis is empty, when batch,
    /// heads, key length or head dimension disagree between tensors, or when any value is NaN/Inf.
    pub fn new(
        q: &'a [f32],
        q_shape: [usize; 4],
        k: &'a [f32],
        k_shape: [usize; 4],
        v: &'a [f32],
        v_shape: [usize; 4],
    ) -> Result<Self> {
        check_len("q", q.len(), &q_shape)?;
        check_len("k", k.len(), &k_shape)?;
        check_len("v", v.len(), &v_shape)?;
        let [b, h, n_q, d] = q_shape;
        if k_shape[0] != b || k_shape[1] != h {
            return Err(Error::shape(
                "k",
                format!(
                    "has batch/heads [{}, {}] but q has shape {q_shape:?} (batch {b}, heads {h})",
                    k_shape[0], k_shape[1]
                ),
            ));
        }
        if k_shape[3] != d {
            return Err(Error::shape(
                "k",
                format!(
                    "has head dim {} but q has shape {q_shape:?} (head dim {d})",
                    k_shape[3]
                ),
            ));
        }
        if v_shape[0] != b || v_shape[1] != h || v_shape[2] != k_shape[2] {
            return Err(Error::shape(
                "v",
                format!(
                    "has shape {v_shape:?} but must be [{b}, {h}, {}, d_v] to match k {k_shape:?}",
                    k_shape[2]
                ),
            ));
        }
        check_finite("q", q)?;
        check_finite("k", k)?;
        check_finite("v", v)?;
        Ok(Self {
            q,
            k,
            v,
            dims: Dims {
                batch: b,
                heads: h,
                n_q,
                n_k: k_shape[2],
                d,
                d_v: v_shape[3],
            },
            key_mask: None,
            query_mask: None,
            projection: None,
        })
    }

    /// Adds a key-padding mask `[batch, n_k]` (`true` = attend to this key).
    pub fn with_key_mask(mut self, mask: &'a [bool]) -> Result<Self> {
        let want = self.dims.batch * self.dims.n_k;
        if mask.len() != want {
            return Err(Error::shape(
                "key_mask",
                format!(
                    "has {} elements but must be [batch, n_k] = [{}, {}] ({want} elements)",
                    mask.len(),
                    self.dims.batch,
                    self.dims.n_k
                ),
            ));
        }
        self.key_mask = Some(mask);
        Ok(self)
    }

    /// Adds a query mask `[batch, n_q]` (`false` rows produce zero output and zero gradient).
    pub fn with_query_mask(mut self, mask: &'a [bool]) -> Result<Self> {
        let want = self.dims.batch * self.dims.n_q;
        if mask.len() != want {
            return Err(Error::shape(
                "query_mask",
                format!(
                    "has {} elements but must be [batch, n_q] = [{}, {}] ({want} elements)",
                    mask.len(),
                    self.dims.batch,
                    self.dims.n_q
                ),
            ));
        }
        self.query_mask = Some(mask);
        Ok(self)
    }

    /// Attaches the layer input X `[batch, n_k, d_model]`, W_V `[d_model, heads·d_v]` and an
    /// optional b_V `[heads·d_v]` from which V was (or would be) computed, for methods that
    /// approximate the value projection itself (MCA). V is not checked against them.
    pub fn with_value_projection(
        mut self,
        x: &'a [f32],
        x_shape: [usize; 3],
        wv: &'a [f32],
        wv_shape: [usize; 2],
        bv: Option<&'a [f32]>,
    ) -> Result<Self> {
        let Dims {
            batch,
            heads,
            n_k,
            d_v,
            ..
        } = self.dims;
        check_len("x", x.len(), &x_shape)?;
        check_len("wv", wv.len(), &wv_shape)?;
        let d_model = x_shape[2];
        if x_shape[0] != batch || x_shape[1] != n_k {
            return Err(Error::shape(
                "x",
                format!(
                    "has shape {x_shape:?} but must be [batch, n_k, d_model] = [{batch}, {n_k}, d_model] to match k"
                ),
            ));
        }
        if wv_shape != [d_model, heads * d_v] {
            return Err(Error::shape(
                "wv",
                format!(
                    "has shape {wv_shape:?} but must be [d_model, heads·d_v] = [{d_model}, {}] (x has d_model {d_model}; {heads} heads of d_v {d_v})",
                    heads * d_v
                ),
            ));
        }
        if let Some(b) = bv {
            if b.len() != heads * d_v {
                return Err(Error::shape(
                    "bv",
                    format!(
                        "has {} elements but must be [heads·d_v] = [{}]",
                        b.len(),
                        heads * d_v
                    ),
                ));
            }
            check_finite("bv", b)?;
        }
        check_finite("x", x)?;
        check_finite("wv", wv)?;
        self.projection = Some(ValueProjection { x, wv, bv, d_model });
        Ok(self)
    }

    /// The value projection attached by [`Self::with_value_projection`], if any.
    pub fn value_projection(&self) -> Option<ValueProjection<'a>> {
        self.projection
    }

    /// The sizes of this call.
    pub fn dims(&self) -> Dims {
        self.dims
    }
    /// All of Q, row-major.
    pub fn q(&self) -> &'a [f32] {
        self.q
    }
    /// All of K, row-major.
    pub fn k(&self) -> &'a [f32] {
        self.k
    }
    /// All of V, row-major.
    pub fn v(&self) -> &'a [f32] {
        self.v
    }
    /// The key-padding mask, if any.
    pub fn key_mask(&self) -> Option<&'a [bool]> {
        self.key_mask
    }
    /// The query mask, if any.
    pub fn query_mask(&self) -> Option<&'a [bool]> {
        self.query_mask
    }

    /// Q of head `bh` (= batch · heads + head), `[n_q, d]`.
    pub fn q_head(&self, bh: usize) -> &'a [f32] {
        let len = self.dims.n_q * self.dims.d;
        &self.q[bh * len..(bh + 1) * len]
    }
    /// K of head `bh`, `[n_k, d]`.
    pub fn k_head(&self, bh: usize) -> &'a [f32] {
        let len = self.dims.n_k * self.dims.d;
        &self.k[bh * len..(bh + 1) * len]
    }
    /// V of head `bh`, `[n_k, d_v]`.
    pub fn v_head(&self, bh: usize) -> &'a [f32] {
        let len = self.dims.n_k * self.dims.d_v;
        &self.v[bh * len..(bh + 1) * len]
    }
    /// Key mask row of batch element `b` (`None` = keep all).
    pub fn key_mask_row(&self, b: usize) -> Option<&'a [bool]> {
        let n = self.dims.n_k;
        self.key_mask.map(|m| &m[b * n..(b + 1) * n])
    }
    /// Query mask row of batch element `b` (`None` = keep all).
    pub fn query_mask_row(&self, b: usize) -> Option<&'a [bool]> {
        let n = self.dims.n_q;
        self.query_mask.map(|m| &m[b * n..(b + 1) * n])
    }

    /// Whether query `i` of head `bh` is kept by the query mask.
    pub fn query_kept(&self, bh: usize, i: usize) -> bool {
        self.query_mask_row(bh / self.dims.heads)
            .is_none_or(|m| m[i])
    }

    /// An output-shaped tensor (an output gradient) with the rows of masked queries zeroed:
    /// borrowed as it is when there is no query mask, copied otherwise.
    pub fn without_masked_queries<'g>(&self, rows: &'g [f32]) -> std::borrow::Cow<'g, [f32]> {
        if self.query_mask.is_none() {
            return std::borrow::Cow::Borrowed(rows);
        }
        let mut owned = rows.to_vec();
        self.zero_masked_queries(&mut owned);
        std::borrow::Cow::Owned(owned)
    }

    /// Zeroes the rows of masked queries in an output-shaped tensor (`[batch, heads, n_q, d_v]`).
    pub fn zero_masked_queries(&self, rows: &mut [f32]) {
        let Dims {
            heads, n_q, d_v, ..
        } = self.dims;
        if self.query_mask.is_none() {
            return;
        }
        for (bh, head) in rows.chunks_exact_mut(n_q * d_v).enumerate() {
            let keep = self.query_mask_row(bh / heads).expect("checked above");
            for (row, k) in head.chunks_exact_mut(d_v).zip(keep) {
                if !k {
                    row.fill(0.0);
                }
            }
        }
    }

    /// Mean of the unmasked value rows of head `bh` and their count (zeros when every key is
    /// masked).
    pub fn unmasked_value_mean(&self, bh: usize) -> (Vec<f32>, usize) {
        let d_v = self.dims.d_v;
        let keep = self.key_mask_row(bh / self.dims.heads);
        let mut mean = vec![0.0f32; d_v];
        let mut count = 0;
        for (j, row) in self.v_head(bh).chunks_exact(d_v).enumerate() {
            if keep.is_none_or(|m| m[j]) {
                count += 1;
                for (a, b) in mean.iter_mut().zip(row) {
                    *a += *b;
                }
            }
        }
        if count > 0 {
            let inv = 1.0 / count as f32;
            for a in mean.iter_mut() {
                *a *= inv;
            }
        }
        (mean, count)
    }

    /// Checks that an output gradient has the output's length and is finite.
    pub fn check_grad_output(&self, grad_output: &[f32]) -> Result<()> {
        let shape = self.dims.out_shape();
        let want = self.dims.out_len();
        if grad_output.len() != want {
            return Err(Error::shape(
                "grad_output",
                format!(
                    "has {} elements but the output has shape {shape:?} ({want} elements)",
                    grad_output.len()
                ),
            ));
        }
        check_finite("grad_output", grad_output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_mismatched_shapes_with_named_arguments() {
        let q = vec![0.0; 2 * 4 * 8 * 16];
        let k = vec![0.0; 2 * 4 * 8 * 32];
        let v = vec![0.0; 2 * 4 * 8 * 16];
        let err = AttentionInputs::new(&q, [2, 4, 8, 16], &k, [2, 4, 8, 32], &v, [2, 4, 8, 16])
            .unwrap_err()
            .to_string();
        assert!(err.contains("k has head dim 32"), "{err}");
        assert!(err.contains("[2, 4, 8, 16]"), "{err}");

        let err = AttentionInputs::new(&q, [2, 4, 8, 16], &q, [2, 4, 8, 16], &v, [2, 4, 7, 16])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("v "), "{err}");
    }

    #[test]
    fn rejects_wrong_length_empty_axes_and_non_finite() {
        let q = vec![0.0; 10];
        let err = AttentionInputs::new(&q, [1, 1, 2, 4], &q, [1, 1, 2, 5], &q, [1, 1, 2, 5]);
        assert!(matches!(err, Err(Error::Shape { arg: "q", .. })));
        let empty: Vec<f32> = vec![];
        let err = AttentionInputs::new(&empty, [1, 1, 0, 4], &q, [1, 1, 2, 5], &q, [1, 1, 2, 5])
            .unwrap_err();
        assert!(err.to_string().contains("empty axis 2"), "{err}");
        let mut bad = vec![1.0; 37];
        bad[33] = f32::NAN;
        let ok = vec![1.0; 37];
        let err = AttentionInputs::new(&ok, [1, 1, 37, 1], &bad, [1, 1, 37, 1], &ok, [1, 1, 37, 1])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "k contains a non-finite value (NaN) at flat index 33"
        );
        bad[33] = f32::NEG_INFINITY;
        let err = check_finite("v", &bad).unwrap_err();
        let huge = [usize::MAX / 2, 4, 1, 1];
        let err2 = AttentionInputs::new(&ok, huge, &ok, huge, &ok, huge).unwrap_err();
        assert!(err2.to_string().contains("too large"), "{err2}");
        assert!(matches!(err, Error::NonFinite { index: 33, .. }));
    }

    #[test]
    fn the_parallel_scan_names_the_first_non_finite_value() {
        // Above the parallel threshold, with the bad values in different chunks.
        let mut x = vec![0.25f32; 1 << 20];
        assert!(check_finite("q", &x).is_ok());
        x[900_000] = f32::NAN;
        x[300_001] = f32::NEG_INFINITY;
        match check_finite("q", &x) {
            Err(Error::NonFinite { arg, index, value }) => {
                assert_eq!((arg, index), ("q", 300_001));
                assert_eq!(value, f32::NEG_INFINITY);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_masks_of_the_wrong_size() {
        let x = vec![0.5; 2 * 3 * 4];
        let inputs =
            AttentionInputs::new(&x, [2, 1, 3, 4], &x, [2, 1, 3, 4], &x, [2, 1, 3, 4]).unwrap();
        let mask = vec![true; 5];
        let err = inputs.with_key_mask(&mask).unwrap_err().to_string();
        assert!(
            err.contains("key_mask has 5 elements but must be [batch, n_k] = [2, 3]"),
            "{err}"
        );
        assert!(inputs.with_query_mask(&mask[..4]).is_err());
        assert!(inputs.with_key_mask(&[true; 6]).is_ok());
    }
}

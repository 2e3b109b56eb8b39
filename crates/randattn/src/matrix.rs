//! Matrix views that carry their shape, and one product over the `gemm` crate.
//!
//! `matmul(dst, accumulate, a, b, alpha)` computes `dst ← alpha·a·b` (or `dst += alpha·a·b`),
//! checking once that the shapes agree, so that a kernel reads as its formula:
//!
//! ```text
//! matmul(MatMut::new(dq, rows, d), true, MatRef::new(ds, rows, cols), MatRef::new(k, cols, d), s)
//! //     dQ (rows × d)          +=          dS (rows × cols)       ·        K (cols × d)       · s
//! ```

/// A read-only `rows × cols` view: element `(i, j)` is `data[i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix stored contiguously.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// A row-major `rows × cols` matrix whose rows start `ld ≥ cols` elements apart.
    ///
    /// # Panics
    /// When `data` is too short for the shape (a bug in the caller, never a user error).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        let view = MatRef {
            data,
            rows,
            cols,
            row_stride: ld,
            col_stride: 1,
        };
        assert!(
            ld >= cols || rows <= 1,
            "matrix rows {ld} apart overlap ({cols} columns)"
        );
        assert!(
            view.fits(),
            "matrix view [{rows}, {cols}] (ld {ld}) too short: {} values",
            data.len()
        );
        view
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// A writable row-major `rows × cols` view whose rows start `ld` elements apart.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    ld: usize,
}

impl<'a> MatMut<'a> {
    /// A row-major `rows × cols` matrix stored contiguously.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// A row-major `rows × cols` matrix whose rows start `ld ≥ cols` elements apart.
    ///
    /// # Panics
    /// When `data` is too short for the shape or `ld < cols` (a bug in the caller).
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, ld: usize) -> Self {
        assert!(
            cols <= ld && (rows == 0 || cols == 0 || (rows - 1) * ld + cols <= data.len()),
            "output view [{rows}, {cols}] (ld {ld}) does not fit {} values",
            data.len()
        );
        MatMut {
            data,
            rows,
            cols,
            ld,
        }
    }
}

/// `dst ← alpha·a·b`, or `dst += alpha·a·b` when `accumulate`.
///
/// Runs single-threaded: callers parallelise over heads and row blocks, which measured faster
/// than letting the GEMM split each head's small product (see `ECOSYSTEM.md`).
///
/// # Panics
/// When the shapes do not agree (a bug in the caller, never a user error).
pub fn matmul(dst: MatMut<'_>, accumulate: bool, a: MatRef<'_>, b: MatRef<'_>, alpha: f32) {
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    assert!(
        a.rows == m && b.rows == k && b.cols == n,
        "matmul shapes: [{m}, {n}] = [{}, {}] · [{}, {}]",
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.data.chunks_mut(dst.ld).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the views' constructors checked that every index the kernel touches lies inside
    // the three slices, and `dst` borrows its slice mutably, so it cannot alias `a` or `b`.
    unsafe { gemm_into(dst.data.as_mut_ptr(), dst.ld, accumulate, a, b, alpha) };
}

/// `dst ← alpha·a·b` (`dst += …` when `read_dst`) through `gemm`, single-threaded, for a
/// row-major destination whose rows start `ld` elements apart.
///
/// # Safety
/// `dst` must be valid for writes of the `rows(a) × cols(b)` block at row stride `ld` (and for
/// reads when `read_dst`), and must not alias `a` or `b`; `k = cols(a) = rows(b) ≥ 1`.
unsafe fn gemm_into(
    dst: *mut f32,
    ld: usize,
    read_dst: bool,
    a: MatRef<'_>,
    b: MatRef<'_>,
    alpha: f32,
) {
    // SAFETY: as the caller guarantees; `a` and `b` are views checked at construction.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            dst,
            1,
            ld as isize,
            read_dst,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `alpha·a·b` as a new row-major `rows(a) × cols(b)` matrix, written by the product alone: no
/// zeroing pass over fresh memory first (for the `n × C` matrices of the sampling methods that
/// pass was a memset of about 5% of a forward + backward).
///
/// # Panics
/// When the shapes do not agree (a bug in the caller, never a user error).
pub fn product(a: MatRef<'_>, b: MatRef<'_>, alpha: f32) -> Vec<f32> {
    let len = a
        .rows
        .checked_mul(b.cols)
        .expect("product size overflows usize");
    let mut out: Vec<f32> = Vec::with_capacity(len);
    product_into(&mut out.spare_capacity_mut()[..len], a, b, alpha);
    // SAFETY: `product_into` initialised every one of the first `len` elements.
    unsafe { out.set_len(len) };
    out
}

/// [`product`] into memory that need not be initialised (a head's block of a fresh output,
/// say): every element of `out` (`rows(a) × cols(b)`, row-major) is written.
///
/// # Panics
/// When the shapes do not agree or `out` is not `rows(a) × cols(b)` long (caller bugs).
pub fn product_into(
    out: &mut [std::mem::MaybeUninit<f32>],
    a: MatRef<'_>,
    b: MatRef<'_>,
    alpha: f32,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(
        b.rows == k && out.len() == m * n,
        "product shapes: [{m}, {k}] · [{}, {n}] into {}",
        b.rows,
        out.len()
    );
    if out.is_empty() || k == 0 {
        out.fill(std::mem::MaybeUninit::new(0.0));
        return;
    }
    // SAFETY: the views' constructors checked that every index the kernel reads lies inside
    // `a` and `b`; `out` has room for `m·n` floats at row stride `n` and, borrowed mutably,
    // aliases neither. With `read_dst = false` gemm never reads the destination and writes
    // every one of its `m·n` elements (each of its paths — tiled, horizontal, matrix-vector —
    // stores `beta·a·b` or zeroes first), so all of `out` is initialised.
    unsafe { gemm_into(out.as_mut_ptr().cast(), n, false, a, b, alpha) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product by definition, in f64.
    fn naive(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f64> {
        let at = |m: &MatRef<'_>, i: usize, j: usize| m.data[i * m.row_stride + j * m.col_stride];
        let mut c = vec![0.0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols)
                    .map(|l| at(&a, i, l) as f64 * at(&b, l, j) as f64)
                    .sum();
            }
        }
        c
    }

    #[test]
    fn products_of_views_and_transposes_match_the_definition() {
        let data: Vec<f32> = (0..200)
            .map(|i| ((i * 37) % 23) as f32 / 7.0 - 1.5)
            .collect();
        let a = MatRef::strided(&data, 5, 3, 4); // 5 × 3 with rows 4 apart
        let b = MatRef::new(&data[50..], 6, 3).t(); // 3 × 6
        let want = naive(a, b);
        let mut c = vec![9.0f32; 5 * 8];
        matmul(MatMut::strided(&mut c, 5, 6, 8), false, a, b, 1.0);
        for i in 0..5 {
            for j in 0..6 {
                assert!((c[i * 8 + j] as f64 - want[i * 6 + j]).abs() < 1e-5);
            }
            assert_eq!(&c[i * 8 + 6..i * 8 + 8], &[9.0, 9.0], "padding untouched");
        }
        matmul(MatMut::strided(&mut c, 5, 6, 8), true, a, b, -2.0);
        for i in 0..5 {
            for j in 0..6 {
                assert!((c[i * 8 + j] as f64 + want[i * 6 + j]).abs() < 1e-5);
            }
        }
        let mut z = vec![1.0f32; 4];
        matmul(
            MatMut::new(&mut z, 2, 2),
            false,
            MatRef::new(&[], 2, 0),
            MatRef::new(&[], 0, 2),
            1.0,
        );
        assert_eq!(z, [0.0; 4], "an empty inner dimension gives zeros");
    }

    #[test]
    fn matmul_handles_transposes_strides_and_accumulation() {
        // a: 3×4 row-major, b stored as 5×4 (so b^T is 4×5).
        let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let b: Vec<f32> = (0..20).map(|i| (i as f32).sin()).collect();
        let mut c = vec![1.0f32; 3 * 6];
        matmul(
            MatMut::strided(&mut c, 3, 5, 6),
            true,
            MatRef::new(&a, 3, 4),
            MatRef::new(&b, 5, 4).t(),
            2.0,
        );
        for i in 0..3 {
            for j in 0..5 {
                let want: f32 =
                    1.0 + 2.0 * (0..4).map(|p| a[i * 4 + p] * b[j * 4 + p]).sum::<f32>();
                assert!((c[i * 6 + j] - want).abs() < 1e-5);
            }
            assert_eq!(c[i * 6 + 5], 1.0, "padding column untouched");
        }
        let mut c2 = vec![7.0f32; 3 * 5];
        matmul(
            MatMut::new(&mut c2, 3, 5),
            false,
            MatRef::strided(&a, 3, 0, 4),
            MatRef::strided(&b, 5, 0, 4).t(),
            1.0,
        );
        assert_eq!(c2, vec![0.0; 15]);
    }

    #[test]
    fn product_is_the_overwriting_matmul_bit_for_bit_at_every_shape() {
        // Matrix-vector, small (the horizontal kernel), tiled (one and several depth blocks) and
        // empty shapes, with transposes.
        for (m, n, k) in [
            (1, 7, 5),
            (7, 1, 5),
            (3, 4, 2),
            (16, 16, 9),
            (70, 33, 64),
            (9, 17, 3000),
            (40, 50, 1500),
            (5, 0, 3),
            (4, 3, 0),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
            let (a, b) = (MatRef::new(&a, m, k), MatRef::new(&b, n, k).t());
            // A destination full of NaN: an element the product left unwritten would show.
            let mut want = vec![f32::NAN; m * n];
            matmul(MatMut::new(&mut want, m, n), false, a, b, 0.5);
            let got = product(a, b, 0.5);
            assert_eq!(got.len(), m * n);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "{m}×{n}×{k}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "matmul shapes")]
    fn mismatched_shapes_are_caught() {
        let data = [0.0f32; 12];
        let mut c = [0.0f32; 4];
        matmul(
            MatMut::new(&mut c, 2, 2),
            false,
            MatRef::new(&data, 2, 3),
            MatRef::new(&data, 2, 2),
            1.0,
        );
    }

    #[test]
    #[should_panic(expected = "too short")]
    fn views_longer_than_their_data_are_caught() {
        let _ = MatRef::new(&[0.0; 5], 2, 3);
    }
}

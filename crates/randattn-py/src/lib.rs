//! `randattn._randattn`, the native half of the Python package `randattn`: numpy arrays in,
//! numpy arrays out, the core's checks and messages as `ValueError`, the kernels run with the
//! interpreter released (`detach`) on a thread pool whose size Python sets. The Python half
//! (`python/randattn/`) adds layouts, keyword parameters, PyTorch and Hugging Face glue.
//!
//! Thin on purpose: everything numerical is the core's (`randattn`), so the same spec and seed
//! give the same bits here as in the CLI.

use std::sync::RwLock;

use numpy::{
    PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3,
    PyReadonlyArray4, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use randattn::{Attention, AttentionInputs, Method};

/// The pool the kernels run on: `None` until first use or after `set_num_threads`/`fork`.
static POOL: RwLock<Option<(usize, std::sync::Arc<rayon::ThreadPool>)>> = RwLock::new(None);

/// Threads asked for with `set_num_threads` (0 = the environment's `RANDATTN_NUM_THREADS`, else
/// every core).
static THREADS: RwLock<usize> = RwLock::new(0);

fn wanted_threads() -> usize {
    let set = *THREADS.read().unwrap_or_else(|e| e.into_inner());
    if set > 0 {
        return set;
    }
    std::env::var("RANDATTN_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The pool of the wanted size (built on first use).
fn pool() -> PyResult<std::sync::Arc<rayon::ThreadPool>> {
    let want = wanted_threads();
    if let Some((n, p)) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref()
        && *n == want
    {
        return Ok(p.clone());
    }
    let p = std::sync::Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(want)
            .thread_name(|i| format!("randattn-{i}"))
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start {want} threads: {e}")))?,
    );
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = Some((want, p.clone()));
    Ok(p)
}

/// After `fork` only the forking thread exists in the child: the parent's pool is unusable there
/// (its workers are gone), so the child forgets it — without joining it — and builds its own on
/// first use (DataLoader workers fork).
extern "C" fn forget_pool_after_fork() {
    if let Ok(mut guard) = POOL.try_write()
        && let Some(old) = guard.take()
    {
        std::mem::forget(old);
    }
}

/// Sets the number of threads the kernels use (at least 1).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 || n > 4096 {
        return Err(PyValueError::new_err(format!(
            "the number of threads must be in 1..=4096, got {n}"
        )));
    }
    *THREADS.write().unwrap_or_else(|e| e.into_inner()) = n;
    Ok(())
}

/// The number of threads the kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    wanted_threads()
}

/// Makes the C allocator keep freed memory for reuse (glibc's mmap and trim thresholds raised),
/// as the `randattn` command line does: otherwise every output above glibc's mmap threshold is
/// mapped afresh and page-faulted on each call. For long-running processes that call the
/// kernels repeatedly (a training loop, a server); it raises the process's resident memory to
/// its peak. Returns whether the allocator accepted it (False off glibc).
#[pyfunction]
fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tuning parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

fn value_error(e: randattn::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The catalog: one dict per method with its name, summary, cost, flags and parameters.
#[pyfunction]
fn methods(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let list = PyList::empty(py);
    for m in Method::catalog() {
        let d = PyDict::new(py);
        d.set_item("name", m.name)?;
        d.set_item("summary", m.summary)?;
        d.set_item("cost", m.cost)?;
        d.set_item("random", m.random)?;
        d.set_item("approximates_softmax", m.approximates_softmax)?;
        d.set_item("needs_value_projection", m.needs_value_projection)?;
        let params = PyList::empty(py);
        for p in &m.params {
            let pd = PyDict::new(py);
            pd.set_item("name", p.name)?;
            pd.set_item("default", &p.default)?;
            pd.set_item("range", &p.range)?;
            pd.set_item("help", p.help)?;
            params.append(pd)?;
        }
        d.set_item("params", params)?;
        list.append(d)?;
    }
    Ok(list)
}

/// The arrays of a sampled value projection: the layer input X, W_V and b_V.
struct Projection {
    x: Py<PyAny>,
    wv: Py<PyAny>,
    bv: Option<Py<PyAny>>,
}

/// The gradients a backward returns: dq, dk, dv and the method's parameter gradients by name.
type Gradients<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyDict>,
);

/// What a forward pass keeps for its backward: the method, the seed, the inputs (the arrays
/// themselves, not copies) and the samples the forward drew. Opaque to Python.
#[pyclass(module = "randattn._randattn", name = "Saved", frozen)]
struct SavedHandle {
    method: Method,
    seed: u64,
    q: Py<PyAny>,
    k: Py<PyAny>,
    v: Py<PyAny>,
    key_mask: Option<Py<PyAny>>,
    query_mask: Option<Py<PyAny>>,
    /// The layer input, W_V and b_V of a method that samples the value projection (MCA); `v`
    /// then holds the projected values `X·W_V + b_V`.
    projection: Option<Projection>,
    saved: randattn::Saved,
    out_shape: [usize; 4],
}

#[pymethods]
impl SavedHandle {
    /// The method spec the forward ran.
    #[getter]
    fn spec(&self) -> String {
        self.method.spec()
    }

    /// The seed the forward ran with.
    #[getter]
    fn seed(&self) -> u64 {
        self.seed
    }

    fn __repr__(&self) -> String {
        format!(
            "<randattn.Saved {} seed={} output={:?}>",
            self.method.spec(),
            self.seed,
            self.out_shape
        )
    }
}

fn shape4(a: &PyReadonlyArray4<'_, f32>) -> [usize; 4] {
    let s = a.shape();
    [s[0], s[1], s[2], s[3]]
}

/// The contiguous data of `a`, or a clear error (the Python side makes arrays contiguous).
fn slice<'a, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, f32, D>,
    name: &str,
) -> PyResult<&'a [f32]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous float32")))
}

fn mask_slice<'a>(
    m: &'a Option<PyReadonlyArray2<'_, bool>>,
    name: &str,
) -> PyResult<Option<&'a [bool]>> {
    m.as_ref()
        .map(|m| {
            m.as_slice().map_err(|_| {
                PyValueError::new_err(format!("{name} must be a C-contiguous bool array"))
            })
        })
        .transpose()
}

/// The core's inputs: Q, K, V with their shapes, and the masks (checked there).
fn inputs<'a>(
    [(q, qs), (k, ks), (v, vs)]: [(&'a [f32], [usize; 4]); 3],
    key_mask: Option<&'a [bool]>,
    query_mask: Option<&'a [bool]>,
) -> randattn::Result<AttentionInputs<'a>> {
    let mut x = AttentionInputs::new(q, qs, k, ks, v, vs)?;
    if let Some(m) = key_mask {
        x = x.with_key_mask(m)?;
    }
    if let Some(m) = query_mask {
        x = x.with_query_mask(m)?;
    }
    Ok(x)
}

/// Recently used methods by spec and settings. A method keeps state worth keeping between calls
/// (Linformer's seeded projections: rebuilding them cost 2-3× its forward at n = 1024-4096,
/// measured), as the CLI's reused `Method` does; the last few are kept.
static RECENT: std::sync::Mutex<Vec<(String, Method)>> = std::sync::Mutex::new(Vec::new());

/// How many methods [`RECENT`] keeps.
const RECENT_CAPACITY: usize = 16;

/// A method that takes V: [`method_of_any`], refusing those that sample the value projection.
fn method_of(spec: &str, settings: Vec<(String, String)>) -> PyResult<Method> {
    let m = method_of_any(spec, settings)?;
    if m.info().needs_value_projection {
        return Err(PyValueError::new_err(format!(
            "{} samples the value projection, so it needs the layer input and W_V, not V: use \
             randattn.forward_projected",
            m.name()
        )));
    }
    Ok(m)
}

/// Parses `spec` with `settings` (`key=value` pairs as the CLI's `--set` takes them), or takes
/// the same method from [`RECENT`].
fn method_of_any(spec: &str, settings: Vec<(String, String)>) -> PyResult<Method> {
    let key = format!("{spec}\u{0}{settings:?}");
    let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = recent.iter().position(|(k, _)| *k == key) {
        let entry = recent.remove(i);
        let m = entry.1.clone();
        recent.insert(0, entry);
        return Ok(m);
    }
    let m = Method::parse(spec, &settings).map_err(value_error)?;
    recent.insert(0, (key, m.clone()));
    recent.truncate(RECENT_CAPACITY);
    Ok(m)
}

/// Forward pass: `[batch, heads, n, d]` float32 arrays (C-contiguous), optional `[batch, n]`
/// bool masks (True = keep); returns the `[batch, heads, n_q, d_v]` output and the handle the
/// backward needs.
#[pyfunction]
#[pyo3(signature = (q, k, v, spec, settings, key_mask=None, query_mask=None, seed=0))]
#[allow(clippy::too_many_arguments)]
fn forward<'py>(
    py: Python<'py>,
    q: PyReadonlyArray4<'py, f32>,
    k: PyReadonlyArray4<'py, f32>,
    v: PyReadonlyArray4<'py, f32>,
    spec: &str,
    settings: Vec<(String, String)>,
    key_mask: Option<PyReadonlyArray2<'py, bool>>,
    query_mask: Option<PyReadonlyArray2<'py, bool>>,
    seed: u64,
) -> PyResult<(Bound<'py, PyAny>, SavedHandle)> {
    let method = method_of(spec, settings)?;
    let (qs, ks, vs) = (shape4(&q), shape4(&k), shape4(&v));
    let (qd, kd, vd) = (slice(&q, "q")?, slice(&k, "k")?, slice(&v, "v")?);
    let (km, qm) = (
        mask_slice(&key_mask, "key_mask")?,
        mask_slice(&query_mask, "query_mask")?,
    );
    let pool = pool()?;
    let (output, saved, out_shape) = py
        .detach(|| {
            pool.install(|| {
                let x = inputs([(qd, qs), (kd, ks), (vd, vs)], km, qm)?;
                let f = method.forward(&x, seed)?;
                Ok::<_, randattn::Error>((f.output, f.saved, x.dims().out_shape()))
            })
        })
        .map_err(value_error)?;
    let out = PyArray1::from_vec(py, output).reshape(out_shape)?;
    let handle = SavedHandle {
        method,
        seed,
        q: q.as_any().clone().unbind(),
        k: k.as_any().clone().unbind(),
        v: v.as_any().clone().unbind(),
        key_mask: key_mask.map(|m| m.as_any().clone().unbind()),
        query_mask: query_mask.map(|m| m.as_any().clone().unbind()),
        projection: None,
        saved,
        out_shape,
    };
    Ok((out.into_any(), handle))
}

/// Forward pass of a method that samples the value projection (MCA): Q and K as in
/// [`forward`], the layer input `x` `[batch, n_k, d_model]`, `wv` `[d_model, heads·d_v]` and
/// `bv` `[heads·d_v]` instead of V.
#[pyfunction]
#[pyo3(signature = (q, k, x, wv, bv, spec, settings, key_mask=None, query_mask=None, seed=0))]
#[allow(clippy::too_many_arguments)]
fn forward_projected<'py>(
    py: Python<'py>,
    q: PyReadonlyArray4<'py, f32>,
    k: PyReadonlyArray4<'py, f32>,
    x: PyReadonlyArray3<'py, f32>,
    wv: PyReadonlyArray2<'py, f32>,
    bv: Option<PyReadonlyArray1<'py, f32>>,
    spec: &str,
    settings: Vec<(String, String)>,
    key_mask: Option<PyReadonlyArray2<'py, bool>>,
    query_mask: Option<PyReadonlyArray2<'py, bool>>,
    seed: u64,
) -> PyResult<(Bound<'py, PyAny>, SavedHandle)> {
    let method = method_of_any(spec, settings)?;
    if !method.info().needs_value_projection {
        return Err(PyValueError::new_err(format!(
            "{} takes V; use randattn.forward",
            method.name()
        )));
    }
    let (qs, ks) = (shape4(&q), shape4(&k));
    let (qd, kd) = (slice(&q, "q")?, slice(&k, "k")?);
    let xs = {
        let s = x.shape();
        [s[0], s[1], s[2]]
    };
    let ws = [wv.shape()[0], wv.shape()[1]];
    let xd = slice(&x, "x")?;
    let wd = slice(&wv, "wv")?;
    let bd = bv.as_ref().map(|b| slice(b, "bv")).transpose()?;
    let (km, qm) = (
        mask_slice(&key_mask, "key_mask")?,
        mask_slice(&query_mask, "query_mask")?,
    );
    let pool = pool()?;
    let (v, vs, output, saved, out_shape) = py
        .detach(|| {
            pool.install(|| {
                let v = randattn::inputs::project_values(xd, xs, wd, bd, qs[1])?;
                let vs = [xs[0], qs[1], xs[1], ws[1] / qs[1].max(1)];
                let (f, out_shape) = {
                    let x = inputs([(qd, qs), (kd, ks), (&v, vs)], km, qm)?
                        .with_value_projection(xd, xs, wd, ws, bd)?;
                    (method.forward(&x, seed)?, x.dims().out_shape())
                };
                // V goes to the handle (the backward needs it) without a copy.
                Ok::<_, randattn::Error>((v, vs, f.output, f.saved, out_shape))
            })
        })
        .map_err(value_error)?;
    let out = PyArray1::from_vec(py, output).reshape(out_shape)?;
    let v = PyArray1::from_vec(py, v).reshape(vs)?;
    let handle = SavedHandle {
        method,
        seed,
        q: q.as_any().clone().unbind(),
        k: k.as_any().clone().unbind(),
        v: v.into_any().unbind(),
        key_mask: key_mask.map(|m| m.as_any().clone().unbind()),
        query_mask: query_mask.map(|m| m.as_any().clone().unbind()),
        projection: Some(Projection {
            x: x.as_any().clone().unbind(),
            wv: wv.as_any().clone().unbind(),
            bv: bv.map(|b| b.as_any().clone().unbind()),
        }),
        saved,
        out_shape,
    };
    Ok((out.into_any(), handle))
}

/// Backward pass of a forward: the gradient of the output (its shape) → `(dq, dk, dv, params)`,
/// with the forward's samples; `params` maps the method's parameter gradients by name (MCA:
/// `x`, `wv`, `bv`; Linformer's and LARA's tensor parameters are not taken from Python, so
/// theirs are left out).
#[pyfunction]
fn backward<'py>(
    py: Python<'py>,
    saved: &SavedHandle,
    grad_out: PyReadonlyArray4<'py, f32>,
) -> PyResult<Gradients<'py>> {
    let bind = |o: &Py<PyAny>| -> PyResult<PyReadonlyArray4<'py, f32>> {
        o.bind(py).extract::<PyReadonlyArray4<'py, f32>>()
    };
    let (q, k, v) = (bind(&saved.q)?, bind(&saved.k)?, bind(&saved.v)?);
    let bind_mask = |o: &Option<Py<PyAny>>| -> PyResult<Option<PyReadonlyArray2<'py, bool>>> {
        o.as_ref()
            .map(|o| o.bind(py).extract::<PyReadonlyArray2<'py, bool>>())
            .transpose()
    };
    let (key_mask, query_mask) = (bind_mask(&saved.key_mask)?, bind_mask(&saved.query_mask)?);
    if shape4(&grad_out) != saved.out_shape {
        return Err(PyValueError::new_err(format!(
            "grad_out has shape {:?} but the output has shape {:?}",
            shape4(&grad_out),
            saved.out_shape
        )));
    }
    let projection = saved
        .projection
        .as_ref()
        .map(|Projection { x, wv, bv }| -> PyResult<_> {
            Ok((
                x.bind(py).extract::<PyReadonlyArray3<'py, f32>>()?,
                wv.bind(py).extract::<PyReadonlyArray2<'py, f32>>()?,
                bv.as_ref()
                    .map(|b| b.bind(py).extract::<PyReadonlyArray1<'py, f32>>())
                    .transpose()?,
            ))
        })
        .transpose()?;
    let projection_slices = projection
        .as_ref()
        .map(|(x, wv, bv)| -> PyResult<_> {
            let s = x.shape();
            Ok((
                slice(x, "x")?,
                [s[0], s[1], s[2]],
                slice(wv, "wv")?,
                [wv.shape()[0], wv.shape()[1]],
                bv.as_ref().map(|b| slice(b, "bv")).transpose()?,
            ))
        })
        .transpose()?;
    let (qs, ks, vs) = (shape4(&q), shape4(&k), shape4(&v));
    let (qd, kd, vd) = (slice(&q, "q")?, slice(&k, "k")?, slice(&v, "v")?);
    let (km, qm) = (
        mask_slice(&key_mask, "key_mask")?,
        mask_slice(&query_mask, "query_mask")?,
    );
    let g = slice(&grad_out, "grad_out")?;
    let pool = pool()?;
    let grads = py
        .detach(|| {
            pool.install(|| {
                let mut x = inputs([(qd, qs), (kd, ks), (vd, vs)], km, qm)?;
                if let Some((xd, xs, wd, ws, bd)) = projection_slices {
                    x = x.with_value_projection(xd, xs, wd, ws, bd)?;
                }
                saved.method.backward(&x, saved.seed, &saved.saved, g)
            })
        })
        .map_err(value_error)?;
    let params = PyDict::new(py);
    for p in grads.params {
        params.set_item(p.name, PyArray1::from_vec(py, p.grad).reshape(p.shape)?)?;
    }
    Ok((
        PyArray1::from_vec(py, grads.dq).reshape(qs)?.into_any(),
        PyArray1::from_vec(py, grads.dk).reshape(ks)?.into_any(),
        PyArray1::from_vec(py, grads.dv).reshape(vs)?.into_any(),
        params,
    ))
}

/// The canonical spec of `spec` with `settings` (what the method runs as), or a `ValueError`.
#[pyfunction]
fn canonical_spec(spec: &str, settings: Vec<(String, String)>) -> PyResult<String> {
    Ok(Method::parse(spec, &settings).map_err(value_error)?.spec())
}

#[pymodule]
fn _randattn(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // SAFETY: registers a plain function; it only takes a lock without blocking.
    unsafe {
        libc::pthread_atfork(None, None, Some(forget_pool_after_fork));
    }
    m.add_function(wrap_pyfunction!(methods, m)?)?;
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    m.add_function(wrap_pyfunction!(forward_projected, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_spec, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(keep_freed_memory, m)?)?;
    m.add_class::<SavedHandle>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

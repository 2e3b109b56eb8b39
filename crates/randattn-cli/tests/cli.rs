//! End-to-end tests of the `randattn` binary: the file contract, every bad-input case (exit code
//! 2 and a message that names the problem), and the JSON shapes other tools parse.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    assert_fails, bin, metrics_without_times, stderr, summary_without_times, tiny_train_steps,
};

fn npy(descr: &str, fortran: bool, shape: &[usize], payload: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let f = if fortran { "True" } else { "False" };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': {f}, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A float32 `.npy` of `shape` filled with `value`.
fn constant_f32(shape: &[usize], value: f32) -> Vec<u8> {
    npy(
        "<f4",
        false,
        shape,
        &f32_bytes(&vec![value; shape.iter().product()]),
    )
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + hl..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

struct Files {
    dir: tempfile::TempDir,
}

const SHAPE: [usize; 4] = [2, 3, 9, 5];

impl Files {
    fn new() -> Files {
        let f = Files {
            dir: tempfile::tempdir().unwrap(),
        };
        let n: usize = SHAPE.iter().product();
        for (name, phase) in [("q", 0.3f32), ("k", 1.1), ("v", 2.3), ("g", 0.7)] {
            let data: Vec<f32> = (0..n).map(|i| (i as f32 * phase).sin()).collect();
            f.write(
                &format!("{name}.npy"),
                &npy("<f4", false, &SHAPE, &f32_bytes(&data)),
            );
        }
        f
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn p(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap();
    }
    fn run(&self, method: &str, extra: &[&str]) -> Output {
        self.run_with_q("q.npy", method, extra)
    }
    /// `run` with another file (possibly missing or broken) as the queries.
    fn run_with_q(&self, q: &str, method: &str, extra: &[&str]) -> Output {
        let mut c = bin();
        c.args([
            "run",
            "--method",
            method,
            "--q",
            &self.p(q),
            "--k",
            &self.p("k.npy"),
        ]);
        c.args(["--v", &self.p("v.npy"), "--out", &self.p("out.npy")]);
        c.args(extra);
        c.output().unwrap()
    }
}

/// Runs the binary with `args` plus `--json FILE`; returns its stdout and the parsed JSON.
fn run_json(args: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.json");
    let o = bin().args(args).arg("--json").arg(&path).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&path).unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    (stdout, serde_json::from_str(&text).unwrap())
}

#[test]
fn run_forward_and_backward_match_the_reference() {
    let f = Files::new();
    let o = f.run(
        "exact",
        &["--grad-out", &f.p("g.npy"), "--grads-dir", &f.p("grads")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let fast = read_f32(&f.path("out.npy"));
    let dq = read_f32(&f.path("grads/dq.npy"));
    assert_eq!(fast.len(), SHAPE.iter().product::<usize>());
    assert_eq!(read_f32(&f.path("grads/dk.npy")).len(), dq.len());
    assert_eq!(read_f32(&f.path("grads/dv.npy")).len(), dq.len());
    let o = f.run(
        "exact-naive",
        &["--grad-out", &f.p("g.npy"), "--grads-dir", &f.p("ref")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for (a, b) in fast.iter().zip(read_f32(&f.path("out.npy"))) {
        assert!((a - b).abs() < 1e-5);
    }
    for (a, b) in dq.iter().zip(read_f32(&f.path("ref/dq.npy"))) {
        assert!((a - b).abs() < 1e-5);
    }
}

#[test]
fn masks_of_every_accepted_dtype_agree() {
    let f = Files::new();
    let keep: Vec<u8> = (0..2 * 9).map(|i| u8::from(i % 4 != 1)).collect();
    let variants: [(&str, Vec<u8>); 4] = [
        ("|b1", keep.clone()),
        ("|u1", keep.clone()),
        (
            "<i8",
            keep.iter()
                .flat_map(|k| (*k as i64).to_le_bytes())
                .collect(),
        ),
        (
            "<f4",
            keep.iter()
                .flat_map(|k| (*k as f32).to_le_bytes())
                .collect(),
        ),
    ];
    let mut outputs = Vec::new();
    for (descr, payload) in variants {
        f.write("m.npy", &npy(descr, false, &[2, 9], &payload));
        let o = f.run("exact", &["--mask", &f.p("m.npy")]);
        assert!(o.status.success(), "{descr}: {}", stderr(&o));
        outputs.push(read_f32(&f.path("out.npy")));
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    let o = f.run("exact", &[]);
    assert!(o.status.success());
    assert_ne!(
        read_f32(&f.path("out.npy")),
        outputs[0],
        "the mask changes the output"
    );

    // Query mask: batch element 0 keeps only its first query row.
    let qkeep: Vec<u8> = (0..2 * 9).map(|i| u8::from(i == 0 || i >= 9)).collect();
    f.write("qm.npy", &npy("|u1", false, &[2, 9], &qkeep));
    let o = f.run("exact", &["--query-mask", &f.p("qm.npy")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = read_f32(&f.path("out.npy"));
    let (heads, n, dv) = (SHAPE[1], SHAPE[2], SHAPE[3]);
    for h in 0..heads {
        for i in 0..n {
            let row = &out[(h * n + i) * dv..][..dv];
            assert_eq!(row.iter().all(|x| *x == 0.0), i != 0, "head {h} row {i}");
        }
    }
}

#[test]
fn bad_files_exit_2_with_clear_messages() {
    let f = Files::new();
    let n: usize = SHAPE.iter().product();
    let ok = f32_bytes(&vec![0.5; n]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "f64",
            npy("<f8", false, &SHAPE, &vec![0; 8 * n]),
            "unsupported dtype `<f8`",
        ),
        (
            "big-endian",
            npy(">f4", false, &SHAPE, &ok),
            "unsupported dtype `>f4`",
        ),
        ("fortran", npy("<f4", true, &SHAPE, &ok), "Fortran"),
        (
            "rank3",
            npy("<f4", false, &[6, 9, 5], &ok),
            "must have rank 4",
        ),
        (
            "truncated",
            npy("<f4", false, &SHAPE, &ok[..ok.len() - 3]),
            "truncated or corrupt",
        ),
        (
            "garbage",
            b"this is not an array".to_vec(),
            "not a .npy file",
        ),
        (
            "mask-as-q",
            npy("|b1", false, &SHAPE, &vec![1; n]),
            "q must be float32",
        ),
    ];
    for (label, bytes, needle) in cases {
        eprintln!("bad-file case: {label}"); // shown with the failure
        f.write("bad.npy", &bytes);
        assert_fails(f.run_with_q("bad.npy", "exact", &[]), needle);
    }
    let mut nan = vec![0.5f32; n];
    nan[17] = f32::NAN;
    f.write("k.npy", &npy("<f4", false, &SHAPE, &f32_bytes(&nan)));
    assert_fails(
        f.run("exact", &[]),
        "k contains a non-finite value (NaN) at flat index 17",
    );
    f.write("k.npy", &constant_f32(&[2, 3, 9, 4], 0.5));
    assert_fails(f.run("exact", &[]), "k has head dim 4");
    assert_fails(f.run_with_q("nope.npy", "exact", &[]), "cannot read");
}

#[test]
fn bad_masks_params_and_flags_exit_2() {
    let f = Files::new();
    f.write("m.npy", &npy("|u1", false, &[2, 9], &[2; 18]));
    assert_fails(
        f.run("exact", &["--mask", &f.p("m.npy")]),
        "must be 0 (drop) or 1 (keep), found 2",
    );
    f.write("m.npy", &npy("|u1", false, &[2, 8], &[1; 16]));
    assert_fails(
        f.run("exact", &["--mask", &f.p("m.npy")]),
        "mask has shape [2, 8] but must be [batch, n] = [2, 9]",
    );
    f.write("m.npy", &npy("<i4", false, &[2, 9], &[0; 72]));
    assert_fails(
        f.run("exact", &["--mask", &f.p("m.npy")]),
        "unsupported dtype `<i4`",
    );
    assert_fails(
        f.run("softmax", &[]),
        "unknown method `softmax`; valid methods: exact-naive, exact",
    );
    assert_fails(
        f.run("exact", &["--set", "tau=3"]),
        "has no parameter `tau`; valid parameters: scale",
    );
    assert_fails(
        f.run("exact", &["--set", "scale=0"]),
        "parameter `scale` of method `exact` must be",
    );
    assert_fails(
        f.run("exact", &["--set", "scale"]),
        "--set expects key=value",
    );
    assert_fails(
        f.run("exact", &["--grad-out", &f.p("g.npy")]),
        "--grads-dir",
    );
    f.write("g.npy", &constant_f32(&[2, 3, 9, 4], 0.5));
    assert_fails(
        f.run(
            "exact",
            &["--grad-out", &f.p("g.npy"), "--grads-dir", &f.p("gr")],
        ),
        "grad-out has shape [2, 3, 9, 4] but the output has shape [2, 3, 9, 5]",
    );
}

#[test]
fn methods_lists_parameters() {
    let o = bin().arg("methods").output().unwrap();
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("exact-naive") && text.contains("--set scale=") && text.contains("1/sqrt(d)"),
        "{text}"
    );
    let o = bin().args(["methods", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["methods"][1]["name"], "exact");
    assert_eq!(v["methods"][1]["params"][0]["name"], "scale");
}

#[test]
fn a_method_spec_means_the_same_as_set() {
    let f = Files::new();
    let mut outputs = Vec::new();
    for (method, extra) in [
        ("performer:features=64", vec![]),
        ("performer", vec!["--set", "features=64"]),
        ("performer:features=8", vec!["--set", "features=64"]),
    ] {
        let mut args = vec!["--seed", "3"];
        args.extend(extra);
        let o = f.run(method, &args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        outputs.push(std::fs::read(f.path("out.npy")).unwrap());
    }
    assert_eq!(outputs[0], outputs[1], "spec vs --set");
    assert_eq!(outputs[0], outputs[2], "--set comes after the spec");
    let o = f.run("performer:features=32", &["--seed", "3"]);
    assert!(o.status.success());
    assert_ne!(std::fs::read(f.path("out.npy")).unwrap(), outputs[0]);
    assert_fails(
        f.run("performer:features", &[]),
        "`features` is not key=value",
    );
    assert_fails(f.run("performer:nope=1", &[]), "has no parameter `nope`");
}

#[test]
fn compare_takes_specs_and_json_to_stdout() {
    let o = bin()
        .args(["compare", "--quick", "--quiet", "--methods"])
        .arg("exact,performer:features=64,nystrom:landmarks=16")
        .args(["--json", "-"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON");
    let specs: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["spec"].as_str().unwrap())
        .collect();
    assert_eq!(
        specs,
        ["exact", "performer:features=64", "nystrom:landmarks=16"]
    );
    assert_eq!(v["results"][1]["params"]["features"], "64");
    assert!(stderr(&o).contains("rel_error"), "the table goes to stderr");
    assert_fails(
        bin()
            .args([
                "compare",
                "--quick",
                "--quiet",
                "--methods",
                "exact,lara:proposals=0",
            ])
            .output()
            .unwrap(),
        "parameter `proposals` of method `lara`",
    );
}

#[test]
fn compare_and_bench_write_the_documented_json() {
    let (text, v) = run_json(&["compare", "--quick", "--quiet"]);
    assert!(
        text.contains("rel_error") && text.contains("exact-naive"),
        "{text}"
    );
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows[0]["method"], "exact");
    for key in [
        "method",
        "params",
        "n",
        "rel_error",
        "forward_ms",
        "speedup_vs_exact",
    ] {
        assert!(rows.iter().all(|r| r.get(key).is_some()), "missing {key}");
    }
    let naive = rows.iter().find(|r| r["method"] == "exact-naive").unwrap();
    assert!(
        naive["rel_error"].as_f64().unwrap() < 1e-5,
        "exact kernels agree: {naive}"
    );

    let (_, v) = run_json(&[
        "bench",
        "--n",
        "64,100",
        "--heads",
        "2",
        "--d",
        "16",
        "--backward",
        "--repeats",
        "1",
        "--quiet",
    ]);
    let rows = v["results"].as_array().unwrap();
    // Every method but exact-naive, at both lengths.
    let methods = randattn::Method::catalog().len() - 1;
    assert_eq!(rows.len(), 2 * methods);
    for key in [
        "method",
        "params",
        "batch",
        "heads",
        "n",
        "d",
        "forward_ms",
        "backward_ms",
        "speedup_vs_exact",
        "peak_extra_bytes",
    ] {
        assert!(rows.iter().all(|r| r.get(key).is_some()), "missing {key}");
    }

    // --no-baseline leaves exact out unless it is named; the speed-up is then null.
    let args = [
        "bench",
        "--n",
        "64",
        "--heads",
        "1",
        "--d",
        "8",
        "--repeats",
        "1",
        "--quiet",
    ];
    let (_, v) = run_json(&[&args[..], &["--methods", "vmean", "--no-baseline"]].concat());
    let solo = v["results"].as_array().unwrap();
    assert_eq!(solo.len(), 1, "{v}");
    assert_eq!(solo[0]["method"], "vmean");
    assert!(solo[0]["speedup_vs_exact"].is_null(), "{v}");
    let (_, v) = run_json(&[&args[..], &["--methods", "exact,vmean", "--no-baseline"]].concat());
    let names: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["exact", "vmean"]);
    assert!(rows[0]["backward_ms"].is_number());
    assert!(rows[0]["peak_extra_bytes"].as_u64().unwrap() > 0);
    assert_fails(
        bin().args(["bench", "--methods", "nope"]).output().unwrap(),
        "unknown method `nope`",
    );
}

/// The real MiniLM layers in `fixtures/minilm` (part of the repository).
fn fixture(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/minilm");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "missing fixture {} (fixtures/minilm is part of the repository)",
        path.display()
    );
    path
}

#[test]
fn exact_reproduces_real_minilm_attention() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.npy");
    for (prefix, mask) in [
        ("layer0", None),
        ("layer5", None),
        ("layer0-padded", Some("layer0-padded-mask.npy")),
    ] {
        let mut c = bin();
        c.args(["run", "--method", "exact"]);
        c.arg("--q").arg(fixture(&format!("{prefix}-q.npy")));
        c.arg("--k").arg(fixture(&format!("{prefix}-k.npy")));
        c.arg("--v").arg(fixture(&format!("{prefix}-v.npy")));
        if let Some(m) = mask {
            c.arg("--mask").arg(fixture(m));
        }
        let o = c.arg("--out").arg(&out).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let got = read_f32(&out);
        let want = read_f32(&fixture(&format!("{prefix}-out.npy")));
        assert_eq!(got.len(), want.len());
        // The reference is float64; f32 storage of O(1) outputs allows ~1e-6 error per element.
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 5e-5, "{prefix}: max abs error {worst}");
    }
}

#[test]
fn exact_never_allocates_an_n_by_n_matrix() {
    let n = 4096u64;
    let (_, v) = run_json(&[
        "bench",
        "--methods",
        "exact",
        "--n",
        "4096",
        "--heads",
        "1",
        "--d",
        "16",
        "--backward",
        "--repeats",
        "1",
        "--quiet",
    ]);
    let peak = v["results"][0]["peak_extra_bytes"].as_u64().unwrap();
    // Forward + backward keep O(n·d) state (output, saved output, lse, gradients, 16 per-chunk
    // dQ buffers = 4 MiB here) plus the GEMM's per-thread packing buffers (larger on AVX-512
    // machines); one n×n f32 matrix alone would be 64 MiB.
    assert!(peak < n * n * 4 / 4, "peak extra bytes {peak}");
}

#[test]
fn yoso_runs_with_the_documented_settings_and_writes_the_conv_gradient() {
    let f = Files::new();
    let grads = ["--grad-out", &f.p("g.npy"), "--grads-dir", &f.p("grads")];
    for method in ["yoso", "yoso-e"] {
        let backward = if method == "yoso" {
            "surrogate-lsh"
        } else {
            "true"
        };
        let mut args = vec!["--set", "tau=12", "--set", "backward"];
        let backward_setting = format!("backward={backward}");
        args[3] = &backward_setting;
        if method == "yoso" {
            args.extend(["--set", "m=32", "--set", "hash=fast"]);
        }
        args.extend(["--set", "conv=3", "--seed", "5"]);
        args.extend(grads);
        let o = f.run(method, &args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let out = read_f32(&f.path("out.npy"));
        assert_eq!(out.len(), SHAPE.iter().product::<usize>());
        assert!(out.iter().all(|x| x.is_finite()));
        // One 3-tap kernel per head.
        assert_eq!(
            read_f32(&f.path("grads/conv_weights.npy")).len(),
            SHAPE[1] * 3
        );
        assert_eq!(read_f32(&f.path("grads/dq.npy")).len(), out.len());
    }
    // Same seed, same output; and the sampled method rejects the yoso-e-only gradient.
    let first = {
        assert!(f.run("yoso", &["--seed", "9"]).status.success());
        read_f32(&f.path("out.npy"))
    };
    assert!(f.run("yoso", &["--seed", "9"]).status.success());
    assert_eq!(read_f32(&f.path("out.npy")), first);
    assert_fails(f.run("yoso", &["--set", "backward=true"]), "use yoso-e");
}

/// MCA from the layer input and weights: with a tiny α it reproduces the model's attention;
/// the backward writes the gradients of X, W_V and b_V; without --x it says what to give; and
/// `exact` accepts --x/--wv/--bv in place of --v (V = X·W_V + b_V).
#[test]
fn mca_runs_from_the_layer_input_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let layer = |c: &mut Command| {
        c.arg("--q").arg(fixture("layer5-q.npy"));
        c.arg("--k").arg(fixture("layer5-k.npy"));
        c.arg("--x").arg(fixture("layer5-x.npy"));
        c.arg("--wv").arg(fixture("layer5-wv.npy"));
        c.arg("--bv").arg(fixture("layer5-bv.npy"));
    };
    let want = read_f32(&fixture("layer5-out.npy"));
    let worst = |got: &[f32]| {
        got.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    for (method, alpha) in [("mca", "1e-6"), ("exact", "")] {
        let mut c = bin();
        c.args(["run", "--method", method]);
        layer(&mut c);
        if !alpha.is_empty() {
            c.args(["--set", &format!("alpha={alpha}")]);
        }
        let o = c.arg("--out").arg(p("o.npy")).output().unwrap();
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        assert!(worst(&read_f32(&p("o.npy"))) < 1e-4, "{method}");
    }
    std::fs::write(p("g.npy"), constant_f32(&[1, 12, 512, 32], 1.0)).unwrap();
    let mut c = bin();
    c.args(["run", "--method", "mca", "--set", "alpha=0.3"]);
    layer(&mut c);
    c.arg("--out").arg(p("o.npy"));
    c.arg("--grad-out").arg(p("g.npy"));
    let o = c.arg("--grads-dir").arg(p("grads")).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for (name, len) in [
        ("x", 512 * 384),
        ("wv", 384 * 384),
        ("bv", 384),
        ("dq", 12 * 512 * 32),
    ] {
        let g = read_f32(&p(&format!("grads/{name}.npy")));
        assert_eq!(g.len(), len, "{name}");
        assert!(
            g.iter().all(|v| v.is_finite()) && g.iter().any(|v| *v != 0.0),
            "{name}"
        );
    }
    let mut c = bin();
    c.args(["run", "--method", "mca"]);
    c.arg("--q").arg(fixture("layer5-q.npy"));
    c.arg("--k").arg(fixture("layer5-k.npy"));
    c.arg("--v").arg(fixture("layer5-v.npy"));
    assert_fails(
        c.arg("--out").arg(p("o.npy")).output().unwrap(),
        "--x and --wv",
    );
}

/// The pretrained model from the command line: `embed` writes unit-norm embeddings; `fidelity`
/// with MCA at α → 0 is exact (cosine 1) and names the YOSO family as not applicable; a missing
/// model says how to fetch it.
#[test]
fn embed_and_fidelity_use_the_pretrained_model() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(
        &input,
        "A man is eating food.\n\nA cat sleeps on the warm roof.\n",
    )
    .unwrap();
    let out = dir.path().join("e.npy");
    let o = bin()
        .args(["embed", "--attention", "exact", "--input"])
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let e = read_f32(&out);
    assert_eq!(e.len(), 2 * 384);
    for row in e.chunks_exact(384) {
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let json = dir.path().join("f.json");
    let o = bin()
        .args([
            "fidelity",
            "--methods",
            "mca:alpha=1e-6,performer:features=32",
            "--seeds",
            "1",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 2);
    assert!(r[0]["cosine_min"].as_f64().unwrap() > 0.99999, "{}", r[0]);
    assert!(r[1]["cosine_mean"].as_f64().unwrap() < 0.999, "{}", r[1]);
    assert_eq!(r[0]["layer_rel_error"].as_array().unwrap().len(), 6);
    let o = bin()
        .args(["fidelity", "--seeds", "1", "--methods", "yoso"])
        .output()
        .unwrap();
    assert_fails(o, "different kernel");
    let o = bin()
        .env("RANDATTN_HOME", dir.path().join("nowhere"))
        .args(["embed", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert_fails(o, "randattn model fetch");
}

/// Tensor parameters from files: Linformer with E = F = I (k = n) is exact attention, its
/// gradients e.npy/f.npy come back; LARA takes proposal means; unknown names and wrong ranks
/// exit 2 naming the problem.
#[test]
fn tensor_parameters_come_from_npy_files() {
    let f = Files::new();
    let [_, h, n, d] = SHAPE;
    let mut eye = vec![0.0f32; h * n * n];
    for hh in 0..h {
        for i in 0..n {
            eye[(hh * n + i) * n + i] = 1.0;
        }
    }
    f.write("eye.npy", &npy("<f4", false, &[h, n, n], &f32_bytes(&eye)));
    let o = f.run("exact", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let exact = read_f32(&f.path("out.npy"));
    let o = f.run(
        "linformer",
        &[
            "--param",
            &format!("e={}", f.p("eye.npy")),
            "--param",
            &format!("f={}", f.p("eye.npy")),
            "--grad-out",
            &f.p("g.npy"),
            "--grads-dir",
            &f.p("grads"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for (a, b) in read_f32(&f.path("out.npy")).iter().zip(&exact) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    assert_eq!(read_f32(&f.path("grads/e.npy")).len(), h * n * n);
    let means: Vec<f32> = (0..h * 4 * d).map(|i| (i as f32 * 0.37).cos()).collect();
    f.write(
        "means.npy",
        &npy("<f4", false, &[h, 4, d], &f32_bytes(&means)),
    );
    let o = f.run(
        "lara",
        &["--param", &format!("proposal_means={}", f.p("means.npy"))],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_fails(
        f.run("performer", &["--param", &format!("e={}", f.p("eye.npy"))]),
        "no tensor parameters",
    );
    assert_fails(
        f.run(
            "lara",
            &["--param", &format!("proposal_means={}", f.p("q.npy"))],
        ),
        "rank 3",
    );
    assert_fails(
        f.run("linformer", &["--param", &format!("e={}", f.p("eye.npy"))]),
        "give both",
    );
}

#[test]
fn data_writes_json_lines_stats_and_the_task_list() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.jsonl");
    let o = bin()
        .args([
            "data", "listops", "--split", "dev", "--count", "5", "--seed", "3",
        ])
        .args(["--set", "min_length=20", "--set", "max_length=80", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&out).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 5);
    for r in &rows {
        let tokens = r["tokens"].as_array().unwrap();
        assert!(tokens.len() > 20 && tokens.len() < 80);
        assert!(r["label"].as_u64().unwrap() < 10);
        let expr = r["text"].as_str().unwrap();
        assert!(expr.starts_with('[') && expr.ends_with(']'), "{expr}");
        assert_eq!(expr.split(' ').count(), tokens.len());
    }
    // The same command gives the same bytes.
    let again = bin()
        .args([
            "data", "listops", "--split", "dev", "--count", "5", "--seed", "3",
        ])
        .args([
            "--set",
            "min_length=20",
            "--set",
            "max_length=80",
            "--out",
            "-",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&again.stdout), text);

    let o = bin()
        .args(["data", "recall", "--stats", "--count", "200"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && s.contains("majority") && s.contains("129 / 129"),
        "{s}"
    );
    let o = bin().args(["data", "--list"]).output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    for task in ["listops", "recall", "image", "text"] {
        assert!(s.contains(&format!("{task}  —")), "{s}");
    }
    assert_fails(
        bin().args(["data", "cifar", "--stats"]).output().unwrap(),
        "unknown task `cifar`; valid tasks:",
    );
    assert_fails(
        bin()
            .args(["data", "recall", "--count", "100000000000", "--out", "-"])
            .output()
            .unwrap(),
        "more than the",
    );
    assert_fails(
        bin()
            .args([
                "data",
                "recall",
                "--start",
                "18446744073709551615",
                "--count",
                "2",
                "--out",
                "-",
            ])
            .output()
            .unwrap(),
        "overflows",
    );
    assert_fails(
        bin()
            .args(["data", "listops", "--stats", "--set", "max_args=1"])
            .output()
            .unwrap(),
        "parameter `max_args` of task `listops`",
    );
}

#[test]
fn data_draws_pathfinder_pngs_and_writes_its_meta() {
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["data", "pathfinder", "--count", "3", "--png"])
        .arg(dir.path())
        .args(["--out", "-"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let pngs: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(pngs.len(), 3);
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["tokens"].as_array().unwrap().len(), 1024);
        assert_eq!(v["meta"]["markers"].as_array().unwrap().len(), 2);
        assert_eq!(v["meta"]["target_lengths"], serde_json::json!([14, 14]));
        let label = v["label"].as_u64().unwrap();
        let name = format!("label{label}.png");
        assert!(pngs.iter().any(|p| {
            p.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(&name)
        }));
    }
    let bytes = std::fs::read(pngs[0].as_ref().unwrap().path()).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_fails(
        bin()
            .args(["data", "listops", "--png"])
            .arg(dir.path())
            .output()
            .unwrap(),
        "--png draws image tasks",
    );
}

/// A tiny recall run's arguments (fast enough for a test).
fn tiny_train(out: &Path, seed: &str) -> Command {
    tiny_train_steps(out, seed, "40", "20")
}

#[test]
fn train_writes_its_run_and_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        let o = tiny_train(out, "3").output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    for key in [
        "task",
        "attention",
        "seed",
        "steps",
        "best_step",
        "best_dev_acc",
        "test_acc",
        "test_acc_final",
        "majority_acc",
        "step_ms",
        "examples_per_s",
        "peak_rss_mib",
        "wall_s",
        "params",
    ] {
        assert!(summary.get(key).is_some(), "summary lacks {key}");
    }
    assert_eq!(summary["attention"], "nystrom:landmarks=4");
    assert_eq!(metrics_without_times(&a).len(), 2);
    assert_eq!(
        metrics_without_times(&a),
        metrics_without_times(&b),
        "same seed, same metrics"
    );
    // The resolved config re-runs the run.
    let c = dir.path().join("c");
    let o = bin()
        .args(["train", "--task", "recall", "--quiet", "--config"])
        .arg(a.join("config.toml"))
        .arg("--out")
        .arg(&c)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(metrics_without_times(&a), metrics_without_times(&c));
    assert_fails(tiny_train(&a, "3").output().unwrap(), "already holds a run");
}

#[test]
fn bad_train_configs_are_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (
            vec!["--override", "train.stepz=3"],
            "unknown key; valid keys of [train]",
        ),
        (vec!["--steps", "0"], "train.steps must be at least 1"),
        (vec!["--batch", "0"], "train.batch must be at least 1"),
        (
            vec!["--attention", "performer:features"],
            "model.attention: method spec",
        ),
        (
            vec!["--override", "model.heads=3"],
            "width a multiple of heads",
        ),
        (
            vec!["--override", "train.lr=fast"],
            "--override `train.lr=fast`",
        ),
    ] {
        let out = dir.path().join("run");
        let o = bin()
            .args(["train", "--task", "listops", "--quiet"])
            .args(&args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert_fails(o, needle);
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    assert_fails(
        bin()
            .args(["train", "--task", "cifar", "--out"])
            .arg(dir.path().join("x"))
            .output()
            .unwrap(),
        "suite `lra` has no task `cifar`; its tasks: listops",
    );
}

#[test]
fn a_killed_run_resumed_ends_as_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, killed) = (dir.path().join("whole"), dir.path().join("killed"));
    let long = |out: &Path| tiny_train_steps(out, "4", "1500", "50");
    let o = long(&whole).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut child = long(&killed).spawn().unwrap();
    let metrics = killed.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 4 {
        assert!(
            started.elapsed().as_secs() < 60,
            "the run never reached 4 evaluations"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("summary.json").exists(),
        "killed too late: the run had finished"
    );
    assert!(killed.join("checkpoint.safetensors").exists());
    let before_kill: f64 = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["elapsed_s"].as_f64())
        .fold(0.0, f64::max);
    let o = bin()
        .args(["train", "--task", "recall", "--resume", "--quiet", "--out"])
        .arg(&killed)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        summary_without_times(&whole),
        summary_without_times(&killed)
    );
    // The resumed run's wall time and step-time median include the time before the kill.
    let wall = |p: &Path| -> f64 {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p.join("summary.json")).unwrap())
                .unwrap();
        v["wall_s"].as_f64().unwrap()
    };
    assert!(
        wall(&killed) >= before_kill,
        "{} < {before_kill}",
        wall(&killed)
    );
    assert_eq!(
        metrics_without_times(&whole),
        metrics_without_times(&killed)
    );
    // A finished run resumed is left alone; a new run into it is refused.
    let o = bin()
        .args(["train", "--task", "recall", "--resume", "--quiet", "--out"])
        .arg(&killed)
        .output()
        .unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("finished"));
}

#[test]
fn zero_negative_and_absurd_sizes_are_errors_not_crashes() {
    for (args, needle) in [
        (&["compare", "--n", "0"][..], "0 is not in 1..=16777216"),
        (&["compare", "--heads", "0"], "0 is not in 1..=65536"),
        (&["compare", "--d", "0"], "0 is not in 1..=65536"),
        (&["compare", "--d", "x"], "invalid digit"),
        (&["bench", "--batch", "0"], "0 is not in 1..=65536"),
        (&["bench", "--repeats", "0"], "0 is not in 1..=10000"),
        (&["bench", "--n", "100000000"], "is not in 1..=16777216"),
        (&["mca-profile", "--n", "0"], "0 is not in 1..=16777216"),
    ] {
        assert_fails(bin().args(args).arg("--quiet").output().unwrap(), needle);
    }
    // Within the ranges but beyond any machine this runs on: refused before allocating.
    let o = bin()
        .args([
            "bench",
            "--methods",
            "exact",
            "--n",
            "16000000",
            "--batch",
            "64",
        ])
        .arg("--quiet")
        .output()
        .unwrap();
    // Q, K, V, X, exact's output and its saved copy (six tensors of 1953.1 GiB) and the
    // log-sum-exps (30.5 GiB); the per-thread tiles add a few MiB.
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let need: f64 = err
        .split("(with exact) needs at least ")
        .nth(1)
        .and_then(|r| r.split(" GiB").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no estimate in: {err}"));
    assert!((11749.2..11750.0).contains(&need), "{err}");
    // A training run too large for the machine: refused before its folder is written.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = bin()
        .args(["train", "--task", "recall", "--batch", "60000", "--quiet"])
        .args(["--override", "model.width=4096", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_fails(
        o,
        "training recall with batch 60000 (width 4096, 2 layers) needs at least",
    );
    assert!(!out.exists(), "nothing written");
    let o = bin()
        .args(["train", "--task", "recall", "--batch", "100000000", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_fails(o, "train.batch must be at most 65536, got 100000000");
}

#[test]
fn a_panic_is_one_line_and_exit_code_70() {
    let o = bin()
        .arg("methods")
        .env("RANDATTN_PANIC_FOR_TEST", "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(70), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("internal error: a panic raised for the test"),
        "{err}"
    );
    assert!(err.contains("please report"), "{err}");
}

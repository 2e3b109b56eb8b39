//! The loaders of real data against the files Debian ships (`.ci/run` installs
//! `dataset-fashion-mnist` and `fortunes`): the first test image, the splits, the documents'
//! sources, and a clear error when the data is missing.

use std::collections::HashSet;
use std::io::Read;

use randattn_tasks::text::{CATEGORIES, fortune_split, read_fortunes};
use randattn_tasks::{Split, TaskSpec};

const MNIST: &str = "/usr/share/datasets/fashion-mnist";
const FORTUNES: &str = "/usr/share/games/fortunes";

fn gunzip(path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(path).expect("dataset-fashion-mnist installed"),
    )
    .read_to_end(&mut out)
    .unwrap();
    out
}

#[test]
fn the_first_test_example_is_the_first_test_image_padded() {
    let task = TaskSpec::parse::<&str>("image", &[]).unwrap();
    let ex = &task.examples(0, Split::Test, 0..1).unwrap()[0];
    let images = gunzip(&format!("{MNIST}/t10k-images-idx3-ubyte.gz"));
    let labels = gunzip(&format!("{MNIST}/t10k-labels-idx1-ubyte.gz"));
    assert_eq!(ex.label, labels[8] as u32);
    assert_eq!(ex.tokens.len(), 1024);
    for r in 0..32 {
        for c in 0..32 {
            let want = if (2..30).contains(&r) && (2..30).contains(&c) {
                images[16 + (r - 2) * 28 + (c - 2)] as u32
            } else {
                0
            };
            assert_eq!(ex.tokens[r * 32 + c], want, "pixel ({r}, {c})");
        }
    }
    // Without the LRA quirk, pixel values shift by one and 0 is padding only.
    let shifted = TaskSpec::parse("image", &[("pad_black", "false")]).unwrap();
    let ex2 = &shifted.examples(0, Split::Test, 0..1).unwrap()[0];
    assert!(ex2.tokens.iter().zip(&ex.tokens).all(|(a, b)| *a == b + 1));
    assert_eq!(shifted.info().vocab, 257);
    // dev = the last 6 000 training images.
    let dev = &task.examples(0, Split::Dev, 5_999..6_000).unwrap()[0];
    let train_labels = gunzip(&format!("{MNIST}/train-labels-idx1-ubyte.gz"));
    assert_eq!(dev.label, train_labels[8 + 59_999] as u32);
    assert_eq!(task.split_sizes().unwrap(), [54_000, 6_000, 10_000]);
    let err = task
        .examples(0, Split::Dev, 0..6_001)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("at most 6000 examples in the dev split"),
        "{err}"
    );
}

#[test]
fn documents_come_from_their_class_and_no_fortune_is_in_two_splits() {
    let task = TaskSpec::parse("text", &[("min_bytes", "300"), ("max_bytes", "900")]).unwrap();
    let pools: Vec<Vec<Vec<u8>>> = CATEGORIES
        .iter()
        .map(|c| read_fortunes(std::path::Path::new(FORTUNES), c).unwrap())
        .collect();
    let mut seen: [HashSet<Vec<u8>>; 3] = Default::default();
    for split in Split::ALL {
        for ex in task.examples(2, split, 0..300).unwrap() {
            let doc: Vec<u8> = ex.tokens.iter().map(|t| (t - 1) as u8).collect();
            assert!((300..=900).contains(&doc.len()));
            // The document opens with a whole fortune of its class and split (or with the start
            // of one, when the first fortune alone is longer than the document).
            let first = pools[ex.label as usize]
                .iter()
                .filter(|f| fortune_split(f) == split)
                .find(|f| doc.starts_with(f) || f.starts_with(&doc))
                .unwrap_or_else(|| {
                    panic!(
                        "{split:?} document of class {} opens with no fortune of it",
                        ex.label
                    )
                });
            seen[split.index()].insert(first.clone());
        }
    }
    assert!(
        seen[0].is_disjoint(&seen[1])
            && seen[0].is_disjoint(&seen[2])
            && seen[1].is_disjoint(&seen[2])
    );
    // Every fortune has one split; all three splits hold fortunes of every class.
    for pool in &pools {
        let splits: HashSet<Split> = pool.iter().map(|f| fortune_split(f)).collect();
        assert_eq!(splits.len(), 3);
    }
}

#[test]
fn missing_data_names_the_package_to_install() {
    for (name, install) in [
        ("image", "apt-get install dataset-fashion-mnist"),
        ("text", "apt-get install fortunes"),
    ] {
        let task = TaskSpec::parse(name, &[("dir", "/no/such/dir")]).unwrap();
        let err = task
            .examples(0, Split::Train, 0..1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not found at /no/such/dir") && err.contains(install),
            "{err}"
        );
    }
}

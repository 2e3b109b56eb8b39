//! The real pretrained model: with exact attention our encoder reproduces
//! sentence-transformers' embeddings of all-MiniLM-L6-v2 (same token ids, cosine ≥ 0.99999,
//! max abs difference ≤ 1e-4). Needs the model in the cache: `randattn model fetch`.

use std::path::Path;

use randattn::Method;
use randattn_nn::model::{DEFAULT_MAX_LEN, SentenceEmbedder, cache_dir};
use serde_json::Value;

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/minilm/reference-embeddings.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "missing {} ({e}; fixtures/minilm is part of the repository)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn embedder(method: &str) -> SentenceEmbedder {
    SentenceEmbedder::load(
        &cache_dir(),
        Method::parse::<&str>(method, &[]).unwrap(),
        DEFAULT_MAX_LEN,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn exact_attention_reproduces_the_reference_embeddings() {
    let r = reference();
    let e = embedder("exact");
    let items = r["items"].as_array().unwrap();
    assert!(items.len() >= 20);
    for item in items {
        let text = item["text"].as_str().unwrap();
        let want_ids: Vec<u32> = item["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = e.embed_one(text, 0).unwrap();
        assert_eq!(got.input_ids, want_ids, "token ids of {text:?}");
        let want: Vec<f64> = item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let dot: f64 = got
            .embedding
            .iter()
            .zip(&want)
            .map(|(a, b)| *a as f64 * b)
            .sum();
        let na: f64 = got
            .embedding
            .iter()
            .map(|a| (*a as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let nb: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
        let cos = dot / (na * nb);
        let worst = got
            .embedding
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(cos >= 0.99999, "{text:?}: cosine {cos}");
        assert!(worst <= 1e-4, "{text:?}: max abs difference {worst}");
    }
    // Longer inputs are truncated to the model card's 256 tokens, keeping [CLS] … [SEP].
    let long = "The licence covers copying, distribution and modification. ".repeat(60);
    let ids = e.tokenize(&long).unwrap();
    assert_eq!(ids.len(), DEFAULT_MAX_LEN);
    assert_eq!((ids[0], ids[ids.len() - 1]), (101, 102));
}

/// A padded batch (masked attention, pooling over real tokens) gives the per-sentence
/// embeddings, for sentences of different lengths.
#[test]
fn padded_batches_equal_single_sentences() {
    let r = reference();
    let e = embedder("exact");
    let texts: Vec<&str> = r["items"].as_array().unwrap()[..6]
        .iter()
        .map(|i| i["text"].as_str().unwrap())
        .collect();
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| e.tokenize(t).unwrap()).collect();
    assert!(ids.iter().map(Vec::len).min() < ids.iter().map(Vec::len).max());
    let batched = e.embed_batch(&ids, 0).unwrap();
    for (seq, got) in ids.iter().zip(&batched) {
        let want = e.embed_ids(seq, 0).unwrap().embedding;
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "max difference {worst}");
    }
}

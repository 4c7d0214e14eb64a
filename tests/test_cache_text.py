"""Cached text embeddings of a frozen encoder: the same Cond, and the same training, as encoding every step."""

from __future__ import annotations

import json

import pytest
import torch
from data_helpers import tiny_autoencoder, tiny_bert
from safetensors.torch import load_file

from latentdiff.conditioning.text import PretrainedTextEncoder, TextEncoderConfig
from latentdiff.config import build_config
from latentdiff.data.cache import CacheConfig, LatentCache, cache_dataset
from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("text_cache")
    tiny_autoencoder(root / "ae")
    te = {"kind": "pretrained", "path": tiny_bert(root / "bert"), "max_length": 16}
    cfg = CacheConfig(autoencoder=str(root / "ae"), out=str(root / "cache"), data="shapes", num_images=12,
                      image_size=16, batch_size=5, shard_size=7, text_encoder=TextEncoderConfig(**te))
    cache_dataset(cfg, quiet=True)
    return {"root": root, "cache": cfg.out, "te": te}


def test_cached_cond_equals_encoding_the_captions(text_cache):
    cache = LatentCache(text_cache["cache"])
    assert cache.text["dim"] == 32 and cache.context.shape[:2] == cache.context_mask.shape
    encoder = PretrainedTextEncoder(TextEncoderConfig(**text_cache["te"]))
    idx = torch.tensor([3, 0, 11, 7, 5])
    for drop in (torch.zeros(5, dtype=torch.bool), torch.tensor([True, False, True, False, False]),
                 torch.ones(5, dtype=torch.bool)):
        cached = cache.text_cond(idx, drop)
        prompts = ["" if d else cache.captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        fresh = encoder(prompts)
        assert torch.equal(cached.context_mask, fresh.context_mask)
        torch.testing.assert_close(cached.context, fresh.context, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached.vector, fresh.vector, atol=1e-5, rtol=1e-5)


def test_training_from_cached_embeddings_matches_encoding_on_the_fly(text_cache, tmp_path, monkeypatch):
    calls = []
    original = PretrainedTextEncoder.forward
    monkeypatch.setattr(PretrainedTextEncoder, "forward", lambda self, p: calls.append(len(p)) or original(self, p))
    runs = {}
    for cached in (True, False):
        calls.clear()
        cfg = build_config(TrainConfig, TRAIN_PRESETS, "shapes-test", None, {
            "cache": text_cache["cache"], "out": str(tmp_path / str(cached)), "steps": 3, "sample_every": 0,
            "caption_dropout": 0.5, "cached_text": cached, "text_encoder": text_cache["te"]})
        model = train_denoiser(cfg)
        runs[cached] = {
            "loss": [json.loads(x)["loss"] for x in (tmp_path / str(cached) / "metrics.jsonl").read_text().splitlines()],
            "weights": load_file(str(model / "denoiser" / "model.safetensors")), "calls": list(calls)}
    assert runs[True]["calls"] == [] and runs[False]["calls"] == [4, 4, 4]  # cached: no text encoder in the loop
    assert len(runs[True]["loss"]) == 3
    torch.testing.assert_close(runs[True]["loss"], runs[False]["loss"], atol=1e-5, rtol=1e-5)
    a, b = runs[True]["weights"], runs[False]["weights"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=0)  # Adam: a few lr-sized steps apart at most


def test_embeddings_of_another_encoder_are_refused(text_cache, tmp_path):
    cache = LatentCache(text_cache["cache"])
    assert not cache.uses_text(TextEncoderConfig())  # a hashed encoder is trained: never cached
    with pytest.raises(ValueError, match=r"another encoder.*max_length.*\(16, 8\)"):
        cache.uses_text(TextEncoderConfig(**{**text_cache["te"], "max_length": 8}))


def test_hashed_encoder_without_layers_keeps_each_word_its_own_feature():
    """num_layers=0: a word's feature depends on the word and its place only, never on its neighbours."""
    from latentdiff.conditioning.text import HashedTextEncoder

    torch.manual_seed(0)
    enc = HashedTextEncoder(TextEncoderConfig(dim=16, num_layers=0, num_heads=2))
    a, b = enc(["a red triangle", "a blue triangle"]).context
    assert torch.equal(a[3], b[3])  # "triangle" after different colours
    assert not torch.equal(a[2], b[2])  # the colours themselves differ
    assert not any(k.startswith("layers.") for k in enc.state_dict())


def test_phrase_pooling_binds_words_within_their_phrase_only():
    """phrase_pool: a word also sees the mean of its phrase's words (phrases end at ',', 'and', 'with', ';'),
    so "red" carries "left" in "a red circle on the left", but nothing from the other object's phrase."""
    from latentdiff.conditioning.text import HashedTextEncoder

    torch.manual_seed(0)
    enc = HashedTextEncoder(TextEncoderConfig(dim=16, num_layers=0, num_heads=2, phrase_pool=True))
    ids, _ = enc.tokenize(["a red circle on the left and a blue square, grey background with a dot"])
    assert enc.phrase_ids(ids)[0].tolist() == [0] * 7 + [1] * 4 + [2] * 3 + [3] * 3
    a, b, c = enc(["a red circle on the left and a blue square", "a red circle on the left and a green square",
                   "a red circle on the right and a blue square"]).context
    assert torch.equal(a[:7], b[:7])  # the first phrase does not see the second object's colour
    assert not torch.equal(a[7:], b[7:])  # the second phrase does
    assert not torch.equal(a[2], c[2])  # "red" knows where its object is
    assert torch.equal(a[8:], c[8:])  # ... and the other phrase does not
    plain = HashedTextEncoder(TextEncoderConfig(dim=16, num_layers=0, num_heads=2))
    assert "phrase_projection.weight" in enc.state_dict() and "phrase_projection.weight" not in plain.state_dict()

"""Tiny components made in the test, shared by the data tests (a plain module: tests/ is on sys.path)."""

from __future__ import annotations

import torch

from latentdiff.components import save_autoencoder
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL


def tiny_autoencoder(folder, seed: int = 0) -> AutoencoderKL:
    """A factor-2 autoencoder with random weights, saved as a component folder."""
    torch.manual_seed(seed)
    ae = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                                         norm_groups=4, mid_attention=False, scale_factor=0.5))
    save_autoencoder(folder, ae)
    return ae.eval()


def tiny_bert(folder) -> str:
    """A 2-layer BERT with random weights and a word-level vocabulary, saved as a transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["a", "an", "the", "small", "large", "red", "green", "blue", "yellow", "purple", "orange", "circle",
             "square", "triangle", "on", "at", "in", "of", "left", "right", "top", "bottom", "middle", "and"]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return str(folder)


def record_train_conds(monkeypatch) -> list:
    """Every Cond that ``train_denoiser``'s loss receives, in order (the loss itself runs unchanged)."""
    import latentdiff.train.denoiser as train_mod

    seen = []
    real = train_mod.denoising_loss

    def spy(denoiser, x0, sigma, cond, **kw):
        seen.append(cond)
        return real(denoiser, x0, sigma, cond, **kw)

    monkeypatch.setattr(train_mod, "denoising_loss", spy)
    return seen

"""``train-lora``'s ``preserve``: self-distillation toward the frozen base model for captions without the new
concept's words. ``denoising_loss``'s ``target`` first (x0 itself changes nothing; the denoiser's own output gives
zero, a mixed target mixes the gradients), then the training loop: from the zero-initialized adapters (the base
model) a cache without the new word is all preserved and its first loss is zero; with the word, or without
preserve, it is the data's loss."""

from __future__ import annotations

import json

import pytest
import torch

from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.losses import denoising_loss
from latentdiff.diffusion.parameterization import EDM
from latentdiff.train.lora import LoRATrainConfig, check_preserve, preserved


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, c_noise, cond=None):
        return self.conv(x) * (1 + c_noise.view(-1, 1, 1, 1))


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 2, 4, 4, generator=g), torch.tensor([0.1, 1.0, 10.0]), torch.randn(3, 2, 4, 4, generator=g)


def test_target_x0_is_the_plain_loss_and_the_denoisers_own_output_is_zero():
    torch.manual_seed(0)
    denoiser = Denoiser(_Net(), EDM())
    x0, sigma, noise = _batch()
    plain = denoising_loss(denoiser, x0, sigma, noise=noise)
    assert plain.min() > 0
    torch.testing.assert_close(denoising_loss(denoiser, x0, sigma, noise=noise, target=lambda x, s: x0), plain)
    seen = {}

    def own(x, s):
        seen["x"], seen["s"] = x, s
        with torch.no_grad():
            return denoiser(x, s)

    assert denoising_loss(denoiser, x0, sigma, noise=noise, target=own).abs().max() < 1e-10
    torch.testing.assert_close(seen["x"], x0 + sigma.view(-1, 1, 1, 1) * noise)  # the target sees the noised data
    # The mixed target is the mixed loss up to a constant: its gradient is the mixture of the two gradients.
    other = torch.randn_like(x0)

    def grads(target):
        denoiser.zero_grad()
        denoising_loss(denoiser, x0, sigma, noise=noise, target=target).sum().backward()
        return denoiser.network.conv.weight.grad.clone()

    mixed = grads(lambda x, s: 0.25 * x0 + 0.75 * other)
    torch.testing.assert_close(mixed, 0.25 * grads(lambda x, s: x0) + 0.75 * grads(lambda x, s: other))


def test_preserved_matches_whole_words_in_any_case():
    keep = preserved(["a small Orange circle", "an oranges tree", "a red square", ""], ("orange", " "))
    assert keep.tolist() == [False, True, True, True]


def test_preserve_needs_words_and_a_fraction():
    with pytest.raises(ValueError, match="preserve_words is empty: name them"):
        check_preserve(LoRATrainConfig(preserve=0.5))
    check_preserve(LoRATrainConfig(preserve=0.5, preserve_words=("orange",)))
    from latentdiff.cli import main

    with pytest.raises(SystemExit):
        main(["train-lora", "--preset", "shapes-test", "--set", "preserve=1.5", "--out", "/nonexistent/x"])


def _first_loss(run) -> float:
    return next(json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in x)


def test_train_lora_preserve_pulls_captions_without_the_word_to_the_base(tmp_path):
    """The first step's loss (before any update; the adapters start at zero, so the model is the base): zero up to
    rounding where every caption is preserved, the data's loss where every caption holds the word or preserve = 0.
    (Not "the adapters never move": the raw-space target's rounding, ~1e-7, is a gradient Adam scales up.)"""
    from latentdiff.cli import main
    from latentdiff.default import verify

    model = verify()
    for name, extra in (("plain", []), ("orange", ["--set", 'extra_colors=["orange"]', "--set", "extra_share=1"])):
        main(["cache", "--autoencoder", str(model / "autoencoder"), "--out", str(tmp_path / name), "--set",
              "num_images=8", "--set", "image_size=32", *extra])
    args = ["train-lora", "--preset", "shapes-test", "--set", "steps=1", "--set", 'preserve_words=["orange"]',
            "--set", "caption_dropout=0"]
    main([*args, "--set", "preserve=1", "--cache", str(tmp_path / "plain"), "--out", str(tmp_path / "kept")])
    main([*args, "--set", "preserve=1", "--cache", str(tmp_path / "orange"), "--out", str(tmp_path / "taught")])
    main([*args, "--set", "preserve=0", "--cache", str(tmp_path / "plain"), "--out", str(tmp_path / "data")])
    main([*args, "--set", "preserve=0.5", "--cache", str(tmp_path / "plain"), "--out", str(tmp_path / "half")])
    kept, taught, data, half = (_first_loss(tmp_path / n) for n in ("kept", "taught", "data", "half"))
    assert kept < 1e-12 and taught > 1e-3 and data > 1e-3, (kept, taught, data)
    # Half way: the target is the midpoint of the data and the base's D, so the loss is a quarter of the data's.
    assert half == pytest.approx(data / 4, rel=1e-4)

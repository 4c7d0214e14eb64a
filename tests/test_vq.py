"""The VQ-regularized autoencoder: codebook lookup, EMA and learned codebooks, usage, training via train-vae."""

import json
from dataclasses import replace

import pytest
import torch
from test_models import one_thread  # noqa: F401 (an autouse fixture)

from latentdiff.cli import main
from latentdiff.components import load_autoencoder, save_autoencoder
from latentdiff.models.autoencoder import AutoencoderConfig
from latentdiff.models.vq import AutoencoderVQ, VectorQuantizer, build_autoencoder


def tiny_vq(**kw) -> AutoencoderVQ:
    torch.manual_seed(0)
    cfg = AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8,
                            latent_channels=3, regularizer="vq", codebook_size=16)
    return build_autoencoder(replace(cfg, **kw))


def test_lookup_is_the_nearest_code_and_gradients_pass_straight_through():
    q = VectorQuantizer(8, 3, ema=False).eval()
    h = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = q(h)
    flat = h.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    brute = torch.cdist(flat, q.embedding.weight.detach()).argmin(1)
    assert torch.equal(out.indices.flatten(), brute)
    torch.testing.assert_close(out.quantized, q.embed(out.indices))  # forward value: the codes
    out.quantized.sum().backward()
    torch.testing.assert_close(h.grad, torch.ones_like(h))  # backward: identity (straight-through)


def test_losses_of_the_two_codebook_kinds():
    h = torch.randn(1, 3, 4, 4)
    learned = VectorQuantizer(8, 3, beta=0.25, ema=False).eval()
    out = learned(h)
    mse = (h - learned.embed(out.indices)).pow(2).mean()
    torch.testing.assert_close(out.loss, 1.25 * mse)  # codebook term + beta * commitment, equal in value
    ema = VectorQuantizer(8, 3, beta=0.25, ema=True).eval()
    out = ema(h)
    torch.testing.assert_close(out.loss, 0.25 * (h - ema.embed(out.indices)).pow(2).mean())


def test_ema_codebook_moves_codes_to_the_mean_of_their_vectors():
    q = VectorQuantizer(2, 1, ema=True, decay=0.0, eps=0.0).train()
    q.initialized.fill_(True)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[-1.0], [1.0]]))
    h = torch.tensor([-3.0, -1.0, 0.5, 2.0, 3.5]).view(1, 1, 1, 5)
    out = q(h)
    assert out.indices.flatten().tolist() == [0, 0, 1, 1, 1]
    torch.testing.assert_close(q.embedding.weight.flatten(), torch.tensor([-2.0, 2.0]))  # cluster means
    torch.testing.assert_close(out.perplexity, torch.exp(-(0.4 * torch.log(torch.tensor(0.4))
                                                           + 0.6 * torch.log(torch.tensor(0.6)))))
    assert out.usage.item() == 1.0


def test_codes_start_at_data_and_dead_codes_restart():
    q = VectorQuantizer(32, 2, ema=True, decay=0.5).train()
    h = torch.randn(1, 2, 8, 8) + 10  # far from the initial codebook near 0
    q(h)
    assert q.initialized and (q.embedding.weight - 10).abs().max() < 5  # codes moved to the data
    for _ in range(10):  # a code nobody uses decays below one assignment and is restarted at an encoder output
        q(h)
    assert (q.cluster_size >= 0.5).all()


def test_vq_autoencoder_round_trip_and_strict_reload(tmp_path):
    vae = tiny_vq().eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 3, 8, 8)
    y = vae.decode(z)
    assert y.shape == x.shape
    # decode quantizes: latents nudged by much less than the code spacing decode to the same image
    torch.testing.assert_close(vae.decode(z + 1e-6), y)
    save_autoencoder(tmp_path / "vq", vae)
    loaded = load_autoencoder(tmp_path / "vq")
    assert isinstance(loaded, AutoencoderVQ) and loaded.config.codebook_size == 16
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), y)


def test_train_vae_trains_a_vq_autoencoder_and_reports_codebook_usage(tmp_path):
    out = tmp_path / "run"
    main(["train-vae", "--preset", "shapes-test", "--out", str(out), "--set", "autoencoder.regularizer=vq",
          "--set", "autoencoder.codebook_size=64", "--set", "image_size=16"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert {"vq", "perplexity", "usage"} <= set(last)
    # usage is the fraction of the 64 codes this batch used, and the perplexity exp(H) of the code frequencies
    # can be no more than the number of codes used (equal only for a uniform use); more than one code is used.
    used = last["usage"] * 64
    assert used == pytest.approx(round(used), abs=1e-4) and used >= 2
    assert 1 < last["perplexity"] <= used + 1e-4
    ae = load_autoencoder(out / "autoencoder")
    assert isinstance(ae, AutoencoderVQ) and ae.config.scale_factor != 1.0
    with pytest.raises(SystemExit):
        main(["train-vae", "--preset", "shapes-test", "--out", str(tmp_path / "bad"),
              "--set", "autoencoder.regularizer=vqq"])

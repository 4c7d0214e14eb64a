"""Autoencoder and U-Net: shapes, oracles, conditioning behaviour and parity with diffusers on tiny configs."""

from dataclasses import replace

import pytest
import torch
from _tiny import one_thread  # noqa: F401  (an autouse fixture: one torch thread in this module)

from latentdiff.models.autoencoder import (
    PRESETS as VAE_PRESETS,
)
from latentdiff.models.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    compute_latent_stats,
    vae_loss,
)
from latentdiff.models.layers import Attention, timestep_embedding
from latentdiff.models.unet import PRESETS as UNET_PRESETS
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.types import Cond


def tiny_vae(**kw) -> AutoencoderKL:
    cfg = AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    return AutoencoderKL(replace(cfg, **kw)).eval()


def tiny_unet(**kw) -> UNet:
    cfg = UNetConfig(
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        num_heads=2,
        context_dim=12,
        norm_groups=8,
    )
    return UNet(replace(cfg, **kw)).eval()


def rand_images(b=2, size=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- layers


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 3.5, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 9).shape == (3, 9)


def test_attention_all_masked_row_is_finite_and_attends_to_all():
    attn = Attention(8, context_dim=6, heads=2, head_dim=4)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    out = attn(x, ctx, torch.zeros(2, 3, dtype=torch.bool))
    torch.testing.assert_close(out, attn(x, ctx))


# ----------------------------------------------------------------------------- autoencoder


@pytest.mark.parametrize("mult,factor", [((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
@pytest.mark.parametrize("latent_channels", [4, 16])
def test_vae_shapes(mult, factor, latent_channels):
    vae = tiny_vae(channel_mult=mult, latent_channels=latent_channels)
    assert vae.factor == factor and vae.latent_channels == latent_channels
    x = rand_images(2, 32)
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (2, latent_channels, 32 // factor, 32 // factor)
        assert vae.decode(z).shape == x.shape
        recon, posterior = vae(x)
    assert recon.shape == x.shape and posterior.mean.shape == z.shape


def test_vae_presets_factors():
    assert VAE_PRESETS["shapes-f4c4"].factor == 4 and VAE_PRESETS["shapes-f8c4"].factor == 8
    assert VAE_PRESETS["shapes-f4c16"].latent_channels == 16
    assert VAE_PRESETS["sd"].factor == 8 and VAE_PRESETS["sd"].scale_factor != 1.0
    vae = AutoencoderKL(VAE_PRESETS["shapes-f4c4"])
    vae.config.scale_factor = 0.5  # what a trainer does after compute_latent_stats
    assert VAE_PRESETS["shapes-f4c4"].scale_factor == 1.0
    assert AutoencoderConfig(channel_mult=(1, 1, 1, 1, 1)).factor == 16


def test_vae_odd_size_raises():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="multiple of 2"):
        vae.encode(rand_images(1, 15))


def test_normalize_round_trip_and_encode_uses_it():
    vae = tiny_vae(scale_factor=0.3, shift_factor=0.7)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z)
    x = rand_images()
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x), (vae.encode_posterior(x).mode() - 0.7) * 0.3)
        torch.testing.assert_close(vae.decode(vae.normalize(z)), vae.decode_raw(z))


def test_posterior_kl_closed_form_and_sampling():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), expected)
    # Samples follow the posterior and are reproducible from a generator.
    big = DiagonalGaussian(
        torch.cat([torch.full((1, 1, 64, 64), 2.0), torch.full((1, 1, 64, 64), 2 * -0.693147)], 1)
    )
    s = big.sample(torch.Generator().manual_seed(1))
    assert abs(s.mean().item() - 2.0) < 0.05 and abs(s.std().item() - 0.5) < 0.05
    torch.testing.assert_close(s, big.sample(torch.Generator().manual_seed(1)))
    assert torch.equal(big.mode(), big.mean)
    # logvar is clamped to [-30, 20].
    assert DiagonalGaussian(torch.tensor([0.0, 100.0]).view(1, 2, 1, 1)).logvar.item() == 20.0


def test_vae_overfits_one_batch():
    torch.manual_seed(0)
    vae = tiny_vae().train()
    x = rand_images(4, 16, seed=3)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        recon, post = vae(x, generator=torch.Generator().manual_seed(0))
        loss, parts = vae_loss(recon, x, post, kl_weight=1e-6, recon="l2")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(parts["recon"].item())
    assert losses[-1] < 0.4 * losses[0], losses
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        vae_loss(recon, x, post, recon="lpips")


def test_compute_latent_stats_normalizes():
    vae = tiny_vae()
    batches = [rand_images(4, 16, seed=s) for s in range(3)]
    scale, shift = compute_latent_stats(vae, batches, sample=False)
    assert isinstance(scale, float) and isinstance(shift, float)
    vae.config.scale_factor, vae.config.shift_factor = scale, shift
    with torch.no_grad():
        lat = torch.cat([vae.encode(b) for b in batches])
    assert abs(lat.mean().item()) < 1e-4 and abs(lat.pow(2).mean().sqrt().item() - 1.0) < 1e-4


# ----------------------------------------------------------------------------- U-Net


def unet_inputs(b=2, size=8, ctx_dim=12, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, generator=g)
    t = torch.rand(b, generator=g) * 999
    ctx = torch.randn(b, length, ctx_dim, generator=g)
    return x, t, ctx


def test_unet_presets():
    tiny = UNET_PRESETS["shapes-tiny"]
    assert tiny.context_dim == 256 and len(tiny.channel_mult) == 2
    assert replace(tiny, context_dim=64).context_dim == 64
    with torch.device("meta"):
        assert 1e6 < sum(p.numel() for p in UNet(tiny).parameters()) < 3e6
        assert round(sum(p.numel() for p in UNet(UNET_PRESETS["sd15"]).parameters()) / 1e6, 2) == 859.52


def test_unet_shape_and_cross_attention_uses_context():
    net = tiny_unet()
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        out = net(x, t, Cond(context=ctx))
        assert out.shape == x.shape
        assert not torch.allclose(out, net(x, t, Cond(context=ctx + 1.0)), atol=1e-4)
        # Padding tokens behind a mask must not matter.
        mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
        ref = net(x, t, Cond(context=ctx, context_mask=mask))
        ctx2 = ctx.clone()
        ctx2[:, 3:] = torch.randn(2, 2, 12)
        torch.testing.assert_close(net(x, t, Cond(context=ctx2, context_mask=mask)), ref)
        torch.testing.assert_close(net(x, t, Cond(context=ctx[:, :3])), ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ref, out, atol=1e-4)


def test_unet_vector_labels_concat_control():
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        net = tiny_unet(vector_dim=6)
        v = torch.randn(2, 6)
        assert not torch.allclose(
            net(x, t, Cond(context=ctx, vector=v)), net(x, t, Cond(context=ctx, vector=-v))
        )
        net = tiny_unet(num_classes=3)
        out0 = net(x, t, Cond(context=ctx, vector=torch.tensor([0, 0])))
        assert not torch.allclose(out0, net(x, t, Cond(context=ctx, vector=torch.tensor([1, 2]))))
        with pytest.raises(ValueError, match="integer labels"):
            net(x, t, Cond(context=ctx, vector=torch.randn(2, 3)))
        net = tiny_unet(concat_channels=1)
        assert net(x, t, Cond(context=ctx, concat=torch.ones(2, 1, 8, 8))).shape == x.shape
        with pytest.raises(ValueError, match="concat"):
            net(x, t, Cond(context=ctx))
        # Zero ControlNet residuals change nothing; non-zero ones do.
        net = tiny_unet()
        ref = net(x, t, Cond(context=ctx))
        shapes = [(2, 16, 8, 8)] * 2 + [(2, 16, 4, 4)] + [(2, 32, 4, 4)] * 2  # conv_in, res, down, res, mid
        zeros = [torch.zeros(s) for s in shapes]
        torch.testing.assert_close(net(x, t, Cond(context=ctx, control=zeros)), ref)
        ones = [torch.ones(s) for s in shapes]
        assert not torch.allclose(net(x, t, Cond(context=ctx, control=ones)), ref)
        with pytest.raises(ValueError, match=r"control\[2\]"):
            net(x, t, Cond(context=ctx, control=zeros[:2] + zeros[3:4] * 3))


def test_unet_errors():
    net = tiny_unet()
    x, t, ctx = unet_inputs()
    with pytest.raises(ValueError, match="divisible by 2"):
        net(x[..., :7, :7], t, Cond(context=ctx))
    with pytest.raises(ValueError, match="context dim 10 .* context_dim 12"):
        net(x, t, Cond(context=torch.randn(2, 5, 10)))
    with pytest.raises(ValueError, match="cond.context"):
        net(x, t)
    with pytest.raises(ValueError, match="divisible by num_heads 3"):
        UNetConfig(model_channels=16, channel_mult=(1, 2), attention_levels=(0, 1), num_heads=3)
    with pytest.raises(ValueError, match="norm groups"):
        tiny_unet(norm_groups=5)


def test_unet_gradient_checkpointing_same_grads():
    x, t, ctx = unet_inputs()
    torch.manual_seed(0)
    a = tiny_unet().train()
    b = tiny_unet(gradient_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    for net in (a, b):
        net(x, t, Cond(context=ctx)).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_unet_bf16_autocast_runs():
    net = tiny_unet()
    x, t, ctx = unet_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, Cond(context=ctx))
    ref = net(x, t, Cond(context=ctx))
    assert out.shape == x.shape and (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ----------------------------------------------------------------------------- parity with diffusers


def assert_rel_close(a, b, tol=1e-4):
    err = (a - b).abs().max() / b.abs().max()
    assert err < tol, f"relative error {err:.2e}"


def test_vae_parity_with_diffusers():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference implementation")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    ).eval()
    ours = tiny_vae(channel_mult=(1, 2, 2))
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical names: no key map needed
    x = rand_images(2, 16)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        post = ours.encode_posterior(x)
        assert_rel_close(post.mean, dist.mean)
        assert_rel_close(post.logvar, dist.logvar)
        assert_rel_close(ours.decode_raw(post.mean), ref.decode(dist.mean).sample)


UNET_PARITY_CASES = {
    # SD 1.x style: conv projections, fixed heads, attention on the high-resolution level.
    "sd1": (
        {
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 2,
        },
        {"attention_levels": (0,), "num_heads": 2},
    ),
    # SDXL style: linear projections, 8-dim heads, per-level depth, vector via add_embedding (text_time).
    "sdxl": (
        {
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (2, 4),
            "transformer_layers_per_block": (1, 2),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 6 + 2 * 4,
        },
        {
            "attention_levels": (1,),
            "head_dim": 8,
            "transformer_depth": (1, 2),
            "use_linear_projection": True,
            "vector_dim": 14,
        },
    ),
    # Class-conditional: label embedding added to the time embedding.
    "labels": (
        {
            "down_block_types": ("CrossAttnDownBlock2D",) * 2,
            "up_block_types": ("CrossAttnUpBlock2D",) * 2,
            "attention_head_dim": 2,
            "num_class_embeds": 5,
        },
        {"attention_levels": (0, 1), "num_heads": 2, "num_classes": 5},
    ),
}


@pytest.mark.parametrize("case", UNET_PARITY_CASES)
def test_unet_parity_with_diffusers(case):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference implementation")
    ref_kw, our_kw = UNET_PARITY_CASES[case]
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=12,
        norm_num_groups=8,
        **ref_kw,
    ).eval()
    ours = tiny_unet(**our_kw)
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical names: no key map needed
    x, t, ctx = unet_inputs()
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])  # row 1: nothing real
    cond, kwargs = Cond(context=ctx, context_mask=mask), {}
    if case == "sdxl":
        text, ids = torch.randn(2, 6), torch.tensor([[64.0, 32.0], [16.0, 48.0]])
        kwargs["added_cond_kwargs"] = {"text_embeds": text, "time_ids": ids}
        cond.vector = torch.cat([text, timestep_embedding(ids.flatten(), 4).view(2, -1)], dim=1)
    if case == "labels":
        cond.vector = torch.tensor([1, 4])
        kwargs["class_labels"] = cond.vector
    with torch.no_grad():
        expected = ref(x, t, ctx, encoder_attention_mask=mask, **kwargs).sample
        assert_rel_close(ours(x, t, cond), expected)

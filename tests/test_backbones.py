"""DiT, MMDiT and the U-Net families: parity with diffusers on tiny configs, conditioning, presets, errors."""

from dataclasses import replace

import pytest
import torch
from _tiny import one_thread  # noqa: F401  (an autouse fixture: one torch thread in this module)

from latentdiff.components import NoiseSchedule
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import make_parameterization
from latentdiff.models import dit as dit_mod
from latentdiff.models import mmdit as mmdit_mod
from latentdiff.models.dit import DiT, DiTConfig
from latentdiff.models.layers import patchify, sincos_pos_embed_2d, unpatchify
from latentdiff.models.mmdit import MMDiT, MMDiTConfig
from latentdiff.models.unet import PRESETS as UNET_PRESETS
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.types import Cond


def assert_rel_close(a, b, tol=1e-4):
    err = (a - b).abs().max() / b.abs().max()
    assert err < tol, f"relative error {err:.2e}"


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (zero-initialized layers would hide errors in a parity test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


# ----------------------------------------------------------------------------- shared pieces


def test_patchify_round_trip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 2 * 3, 2 * 2 * 3)
    # Token 1 is the patch at row 0, column 1; inside it, channels vary fastest.
    torch.testing.assert_close(tokens[0, 1].view(2, 2, 3).permute(2, 0, 1), x[0, :, 0:2, 2:4])
    torch.testing.assert_close(unpatchify(tokens, 2, 2, 3), x)


def test_sincos_pos_embed_matches_diffusers():
    emb = pytest.importorskip("diffusers.models.embeddings", reason="diffusers is the reference implementation")
    ref = emb.get_2d_sincos_pos_embed(16, 6, base_size=4, interpolation_scale=1.5, output_type="pt")
    assert_rel_close(sincos_pos_embed_2d(16, 6, 6, base_size=4, scale=1.5), ref.float(), 1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(18, 2, 2, 2)


# ----------------------------------------------------------------------------- DiT


def tiny_dit(**kw) -> DiT:
    cfg = DiTConfig(sample_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2)
    return randomize(DiT(replace(cfg, **kw))).eval()


def dit_inputs(b=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, size, size, generator=g), torch.rand(b, generator=g) * 999


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_dit_parity_with_diffusers(learn_sigma):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference implementation")
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8 if learn_sigma else 4,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()
    state = ref.state_dict()
    # diffusers keeps a copy of the embedders in every block; converted DiT checkpoints hold one and the same.
    for k in [k for k in state if k.startswith("transformer_blocks.1.norm1.emb.")]:
        state[k] = state[k.replace("blocks.1.", "blocks.0.")]
    ref.load_state_dict(state)
    ours = DiT(dit_mod.config_from_diffusers(dict(ref.config))).eval()
    assert ours.config.learn_sigma == learn_sigma
    ours.load_state_dict(dit_mod.from_diffusers_state_dict(state, depth=2), strict=True)
    x, t = dit_inputs()
    labels = torch.tensor([3, 10])  # 10 = the null class
    with torch.no_grad():
        expected = ref(x, t, class_labels=labels).sample[:, :4]
        assert_rel_close(ours(x, t, Cond(vector=labels)), expected)
        # Another grid size than sample_size: both recompute the position table the same way.
        x2 = torch.randn(2, 4, 12, 12)
        assert_rel_close(ours(x2, t, Cond(vector=labels)), ref(x2, t, class_labels=labels).sample[:, :4])


def test_dit_embedder_table_refuses_per_block_embedders():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference implementation")
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8,
                                          num_embeds_ada_norm=10)
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight differs"):
        dit_mod.from_diffusers_state_dict(ref.state_dict(), depth=2)


def test_dit_text_block_matches_diffusers_basic_block():
    """Our cross-attention DiT block is diffusers' BasicTransformerBlock with adaLN-Zero and cross-attention."""
    attention = pytest.importorskip("diffusers.models.attention", reason="diffusers is the reference")
    torch.manual_seed(0)
    ref = attention.BasicTransformerBlock(16, 2, 8, cross_attention_dim=12, activation_fn="gelu-approximate",
                                          num_embeds_ada_norm=10, attention_bias=True, norm_type="ada_norm_zero",
                                          norm_elementwise_affine=False).eval()
    ours = dit_mod.DiTBlock(DiTConfig(hidden_size=16, num_heads=2, context_dim=12, sample_size=8)).eval()
    state = {k: v for k, v in ref.state_dict().items() if ".emb." not in k}
    ours.load_state_dict(state, strict=True)
    x, ctx, t, labels = torch.randn(2, 9, 16), torch.randn(2, 5, 12), torch.tensor([3.0, 500.0]), torch.tensor([1, 2])
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    with torch.no_grad():
        c = ref.norm1.emb(t, labels, hidden_dtype=torch.float32)
        expected = ref(x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t, class_labels=labels)
        assert_rel_close(ours(x, c, ctx, mask), expected)


def test_dit_presets():
    names = {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    assert names <= set(dit_mod.PRESETS) and "dit-shapes" in dit_mod.PRESETS
    with torch.device("meta"):
        # DiT-XL/2 has 675M parameters (paper, Table 4); DiT-S/8 is about 33M.
        n = sum(p.numel() for p in DiT(dit_mod.PRESETS["DiT-XL/2"]).parameters())
        assert round(n / 1e6) == 675, n
        assert 30e6 < sum(p.numel() for p in DiT(dit_mod.PRESETS["DiT-S/8"]).parameters()) < 35e6


def test_dit_starts_as_zero_and_text_conditioning_matters():
    cfg = DiTConfig(sample_size=8, hidden_size=16, depth=2, num_heads=2, context_dim=12, vector_dim=6)
    x, t = dit_inputs()
    ctx, vec = torch.randn(2, 5, 12), torch.randn(2, 6)
    fresh = DiT(cfg)
    assert torch.equal(fresh(x, t, Cond(context=ctx, vector=vec)), torch.zeros_like(x))  # adaLN-Zero output
    net = randomize(DiT(cfg)).eval()
    with torch.no_grad():
        out = net(x, t, Cond(context=ctx, vector=vec))
        assert out.shape == x.shape
        assert not torch.allclose(out, net(x, t, Cond(context=ctx + 1, vector=vec)), atol=1e-4)
        assert not torch.allclose(out, net(x, t, Cond(context=ctx, vector=-vec)), atol=1e-4)
        mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
        ref = net(x, t, Cond(context=ctx, context_mask=mask, vector=vec))
        torch.testing.assert_close(net(x, t, Cond(context=ctx[:, :3], vector=vec)), ref, atol=1e-5, rtol=1e-5)


def test_dit_text_blocks_start_as_the_identity():
    """adaLN-Zero with text: a fresh block returns its input, cross-attention included (PixArt zero-inits it).

    An ungated cross-attention with a random output layer adds a text-dependent vector to every token in
    every block, so a fresh text DiT's final tokens are half input, half noise (see ``DiT.reset_parameters``).
    """
    cfg = DiTConfig(sample_size=8, hidden_size=16, depth=3, num_heads=2, context_dim=12, vector_dim=6)
    net = DiT(cfg)
    tokens, ctx, vec = torch.randn(2, 16, 16), torch.randn(2, 5, 12), torch.randn(2, 6)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    c = net.embed(torch.tensor([10.0, 900.0]), Cond(vector=vec), 2)
    with torch.no_grad():
        for block in net.transformer_blocks:
            torch.testing.assert_close(block(tokens, c, ctx, mask), tokens, atol=0, rtol=0)


def test_dit_errors():
    x, t = dit_inputs()
    with pytest.raises(ValueError, match="divisible by num_heads 3"):
        DiTConfig(hidden_size=16, num_heads=3)
    with pytest.raises(ValueError, match="only one"):
        DiTConfig(num_classes=3, vector_dim=4)
    net = tiny_dit(num_classes=4)
    with pytest.raises(ValueError, match="integer labels"):
        net(x, t, Cond(vector=torch.randn(2, 4)))
    with pytest.raises(ValueError, match="divisible by the patch size 2"):
        net(x[..., :7, :7], t, Cond(vector=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="cross-attends"):
        tiny_dit(context_dim=12)(x, t)
    with pytest.raises(ValueError, match="no cross-attention"):
        tiny_dit()(x, t, Cond(context=torch.randn(2, 3, 12)))


# ----------------------------------------------------------------------------- MMDiT


def mmdit_inputs(b=2, size=8, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, generator=g)
    t = torch.rand(b, generator=g) * 1000
    return x, t, Cond(context=torch.randn(b, length, 12, generator=g), vector=torch.randn(b, 6, generator=g))


def tiny_mmdit(**kw) -> MMDiT:
    cfg = MMDiTConfig(in_channels=4, sample_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2,
                      context_dim=12, vector_dim=6, pos_embed_max_size=8)
    return randomize(MMDiT(replace(cfg, **kw))).eval()


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_mmdit_parity_with_diffusers(qk_norm):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference implementation")
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
        pos_embed_max_size=8, qk_norm=qk_norm,
    ).eval()
    randomize(ref)  # diffusers' own init leaves the RMS-norm weights at 1; random ones test them too
    ours = MMDiT(mmdit_mod.config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical names: no key map needed
    for size in (8, 6):  # the full position table and a center crop of it
        x, t, cond = mmdit_inputs(size=size)
        with torch.no_grad():
            expected = ref(x, cond.context, cond.vector, t).sample
            assert_rel_close(ours(x, t, cond), expected)


def test_mmdit_presets():
    assert {"sd3-medium", "sd35-large", "mmdit-shapes"} <= set(mmdit_mod.PRESETS)
    with torch.device("meta"):
        n = sum(p.numel() for p in MMDiT(mmdit_mod.PRESETS["sd3-medium"]).parameters())
    assert 2.0e9 < n < 2.1e9, n  # SD3 medium: "2B"


def test_mmdit_starts_as_zero_mask_and_conditioning():
    x, t, cond = mmdit_inputs()
    fresh = MMDiT(replace(tiny_mmdit().config))
    assert torch.equal(fresh(x, t, cond), torch.zeros_like(x))
    net = tiny_mmdit(qk_norm=True)
    with torch.no_grad():
        out = net(x, t, cond)
        assert not torch.allclose(out, net(x, t, replace(cond, context=cond.context + 1)), atol=1e-4)
        assert not torch.allclose(out, net(x, t, replace(cond, vector=-cond.vector)), atol=1e-4)
        # Masked padding tokens change nothing: same as dropping them.
        mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
        masked = net(x, t, replace(cond, context_mask=mask))
        short = net(x, t, replace(cond, context=cond.context[:, :3]))
        torch.testing.assert_close(masked, short, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(masked, out, atol=1e-4)


@pytest.mark.parametrize("family", ["dit", "mmdit"])
def test_transformer_gradient_checkpointing_same_grads(family):
    x, t, cond = mmdit_inputs()
    if family == "dit":
        make, cond = tiny_dit, Cond(vector=torch.tensor([1, 2]))
        kw = {"num_classes": 4}
    else:
        make, kw = tiny_mmdit, {}
    a, b = make(**kw).train(), make(gradient_checkpointing=True, **kw).train()
    b.load_state_dict(a.state_dict())
    for net in (a, b):
        net(x, t, cond).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_mmdit_errors():
    x, t, cond = mmdit_inputs()
    net = tiny_mmdit()
    with pytest.raises(ValueError, match="pooled text vector"):
        net(x, t, replace(cond, vector=None))
    with pytest.raises(ValueError, match=r"text tokens cond.context of shape \(2, L, 12\)"):
        net(x, t, replace(cond, context=torch.randn(2, 5, 7)))
    with pytest.raises(ValueError, match="larger than the position table"):
        net(torch.randn(2, 4, 18, 18), t, cond)
    with pytest.raises(ValueError, match="dual_attention_layers"):
        mmdit_mod.config_from_diffusers({"dual_attention_layers": [0]})


# ----------------------------------------------------------------------------- U-Net families (SD 2.x, real sizes)


# SD 2.x in miniature: cross-attention on every level but the last, linear projections, a head count per block
# (diffusers' `attention_head_dim` holds head counts: SD 2.x's [5, 10, 20, 20] are 64-dim heads), upcast attention.
SD2_REF = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32, 32), "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": (2, 4, 4), "cross_attention_dim": 12, "norm_num_groups": 8, "use_linear_projection": True,
    "upcast_attention": True,
}
SD2_OURS = UNetConfig(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
                      head_dim=8, context_dim=12, norm_groups=8, use_linear_projection=True)


def sd2_pair():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference implementation")
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**SD2_REF).eval()
    ours = UNet(SD2_OURS).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical names: no key map needed
    return ref, ours


def test_sd2_style_unet_parity():
    ref, ours = sd2_pair()
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 900.0]), torch.randn(2, 7, 12, generator=g)
    with torch.no_grad():
        assert_rel_close(ours(x, t, Cond(context=ctx)), ref(x, t, ctx).sample)


def test_sd2_v_prediction_x0_matches_diffusers_scheduler():
    """Our Denoiser (v parameterization, EDM coordinates) predicts the x0 diffusers' DDIM step derives from v."""
    ref, ours = sd2_pair()
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule(betas="scaled_linear")
    denoiser = Denoiser(ours, make_parameterization("v", alphas_cumprod=schedule.alphas_cumprod()))
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    prediction_type="v_prediction", clip_sample=False)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 7, 12, generator=g)
    for t in sched.timesteps[[0, 4, 9]]:
        x_t = torch.randn(1, 4, 8, 8, generator=g)  # VP coordinates: x_t = alpha x0 + s eps
        with torch.no_grad():
            x0_ref = sched.step(ref(x_t, t, ctx).sample, t, x_t).pred_original_sample
            ac = sched.alphas_cumprod[t].double()
            sigma = ((1 - ac) / ac).sqrt()  # the EDM-coordinate noise level of this timestep
            x0_ours = denoiser((x_t.double() / ac.sqrt()).float(), sigma.view(1), Cond(context=ctx))
        assert_rel_close(x0_ours, x0_ref, 1e-4)


REAL_CONFIGS = {
    "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8},
    "sd21": {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
                 "upcast_attention": True},
    "sdxl": {
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048,
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}


@pytest.mark.parametrize("preset", REAL_CONFIGS)
def test_real_size_presets_have_diffusers_keys_and_shapes(preset):
    """The sd15 / sd21 / sdxl presets are the published networks: every tensor name and shape as diffusers'."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference implementation")
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**REAL_CONFIGS[preset]).state_dict()
        ours = UNet(UNET_PRESETS[preset]).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}

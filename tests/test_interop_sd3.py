"""SD 3 / 3.5 single files: an original-layout file written here from a tiny diffusers SD3 model loads
through ``latentdiff.load`` onto our MMDiT, autoencoder and CLIP encoders, and computes what diffusers does.

The original layout (Stability's reference MMDiT: ``joint_blocks.N.x_block`` / ``context_block``, fused
``attn.qkv``, ``(shift, scale)`` final adaLN) is written out below by hand, independently of the
loader's tables, so a wrong table cannot agree with a wrong writer.
"""

from __future__ import annotations

import json

import pytest
import torch

import latentdiff
from latentdiff.interop.keymaps import KeyMap, vae_rules
from latentdiff.interop.single_file import VAE, UnsupportedCheckpoint, read_single_file
from latentdiff.io import write_safetensors
from latentdiff.models.autoencoder import AutoencoderConfig
from latentdiff.types import Cond

diffusers = pytest.importorskip("diffusers", reason="diffusers builds the reference SD3 transformer")
transformers = pytest.importorskip("transformers", reason="SD3's CLIP encoders are transformers models")

from interop_tiny import clip_config, one_thread, tiny_vae, write_tokenizer

P = "model.diffusion_model."
DEPTH = 3
OVERRIDES = {"mmdit": {"num_heads": 4, "sample_size": 8}, "vae": {"norm_groups": 4},
             "text_encoder_0": {"num_attention_heads": 4}, "text_encoder_1": {"num_attention_heads": 4}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


def tiny_sd3(qk_norm: str | None = None):
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=DEPTH, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=40,
        pos_embed_max_size=8, qk_norm=qk_norm).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random everywhere: zero-initialized layers would hide a wrong mapping
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ref


def _swap(t):
    a, b = t.chunk(2)
    return torch.cat([b, a])


def original_mmdit(ref_state: dict) -> dict:
    """diffusers SD3Transformer2DModel state -> Stability's reference layout, written out by hand."""
    s, o = dict(ref_state), {}

    def move(orig, ours, f=lambda t: t):
        o[P + orig] = f(s.pop(ours))

    move("pos_embed", "pos_embed.pos_embed")
    for n in ("weight", "bias"):
        move(f"x_embedder.proj.{n}", f"pos_embed.proj.{n}")
        move(f"t_embedder.mlp.0.{n}", f"time_text_embed.timestep_embedder.linear_1.{n}")
        move(f"t_embedder.mlp.2.{n}", f"time_text_embed.timestep_embedder.linear_2.{n}")
        move(f"y_embedder.mlp.0.{n}", f"time_text_embed.text_embedder.linear_1.{n}")
        move(f"y_embedder.mlp.2.{n}", f"time_text_embed.text_embedder.linear_2.{n}")
        move(f"context_embedder.{n}", f"context_embedder.{n}")
        move(f"final_layer.linear.{n}", f"proj_out.{n}")
        move(f"final_layer.adaLN_modulation.1.{n}", f"norm_out.linear.{n}", _swap)  # (scale, shift) -> (shift, scale)
        for i in range(DEPTH):
            d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
            o[P + f"{x}.attn.qkv.{n}"] = torch.cat([s.pop(f"{d}.attn.to_{q}.{n}") for q in "qkv"])
            o[P + f"{c}.attn.qkv.{n}"] = torch.cat([s.pop(f"{d}.attn.add_{q}_proj.{n}") for q in "qkv"])
            move(f"{x}.attn.proj.{n}", f"{d}.attn.to_out.0.{n}")
            move(f"{x}.adaLN_modulation.1.{n}", f"{d}.norm1.linear.{n}")
            move(f"{x}.mlp.fc1.{n}", f"{d}.ff.net.0.proj.{n}")
            move(f"{x}.mlp.fc2.{n}", f"{d}.ff.net.2.{n}")
            if i < DEPTH - 1:
                move(f"{c}.attn.proj.{n}", f"{d}.attn.to_add_out.{n}")
                move(f"{c}.adaLN_modulation.1.{n}", f"{d}.norm1_context.linear.{n}")
                move(f"{c}.mlp.fc1.{n}", f"{d}.ff_context.net.0.proj.{n}")
                move(f"{c}.mlp.fc2.{n}", f"{d}.ff_context.net.2.{n}")
            else:  # context pre-only: AdaLayerNormContinuous-like, (scale, shift) in diffusers
                move(f"{c}.adaLN_modulation.1.{n}", f"{d}.norm1_context.linear.{n}", _swap)
    for i in range(DEPTH):
        d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        for orig, ours in ((f"{x}.attn.ln_q", "attn.norm_q"), (f"{x}.attn.ln_k", "attn.norm_k"),
                           (f"{c}.attn.ln_q", "attn.norm_added_q"), (f"{c}.attn.ln_k", "attn.norm_added_k")):
            if f"{d}.{ours}.weight" in s:
                move(f"{orig}.weight", f"{d}.{ours}.weight")
    assert not s, f"the hand-written inverse left {sorted(s)[:5]}"
    return o


def original_vae():
    vae = tiny_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                   shift_factor=0.0609)  # the SD3 VAE's
    cfg = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=16,
                            norm_groups=4, use_quant_conv=False)
    state, absent = KeyMap(vae_rules(cfg), VAE).to_original(vae.state_dict())
    assert not absent
    return vae, state


def tiny_clips(tmp_path):
    """CLIP-L (quick_gelu) and CLIP-G (gelu), both with projections, and their tokenizers in a diffusers layout."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = tmp_path / "sd3_tokenizers"
    tok1 = CLIPTokenizer.from_pretrained(write_tokenizer(folder / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(write_tokenizer(folder / "tokenizer_2", pad="!"))
    torch.manual_seed(4)
    clip_l = CLIPTextModelWithProjection(clip_config(len(tok1), hidden=16, layers=2, projection=16)).eval()
    clip_g = CLIPTextModelWithProjection(clip_config(len(tok2), hidden=24, layers=2, projection=24,
                                                     act="gelu")).eval()
    return folder, (tok1, tok2), (clip_l, clip_g)


def tiny_t5(folder):
    """A T5 encoder of the MMDiT's joint width (48) and a character-level T5-style tokenizer in ``tokenizer_3/``."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(string.ascii_lowercase)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=256)
    tok.save_pretrained(folder / "tokenizer_3")
    torch.manual_seed(5)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=6,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False, use_cache=False)).eval()
    with torch.no_grad():  # T5's own init is tiny; larger weights make the tokens matter in the comparison
        for p in t5.parameters():
            p.mul_(20.0)
    return tok, t5


def write_sd3_file(path, ref, clips=None, t5=None) -> None:
    state = original_mmdit(ref.state_dict())
    state.update(original_vae()[1])
    for name, model in zip(("clip_l", "clip_g"), clips or ()):
        for k, v in model.state_dict().items():
            if not k.endswith("position_ids"):
                state[f"text_encoders.{name}.transformer.{k if k.startswith(('text_model.', 'text_projection')) else 'text_model.' + k}"] = v
    if t5 is not None:  # SD3 files keep the tied input embedding once, as shared.weight
        state.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.state_dict().items()
                      if k != "encoder.embed_tokens.weight"})
    write_safetensors(path, state)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 8, generator=g)
    t = torch.rand(2, generator=g)  # flow time
    return x, t, torch.randn(2, 7, 48, generator=g), torch.randn(2, 40, generator=g)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_sd3_single_file_matches_diffusers(qk_norm, tmp_path, capsys):
    ref = tiny_sd3(qk_norm)
    path = tmp_path / "sd3.safetensors"
    write_sd3_file(path, ref)
    pipe = latentdiff.load(path, overrides=OVERRIDES)
    printed = capsys.readouterr().out
    family = "sd35" if qk_norm else "sd3"
    assert f"detected {family}: flow-prediction" in printed
    assert "mmdit: " in printed and "vae: " in printed and "missing" not in printed and "unused" not in printed

    x, t, ctx, pooled = _inputs()
    net = pipe.denoiser.network
    with torch.no_grad():
        expected = ref(x, ctx, pooled, t * 1000).sample
        got = net(x, t * 1000, Cond(context=ctx, vector=pooled))
        assert _rel(got, expected) < 1e-4
        # Through the flow parameterization: D(x, sigma) = x0_hat from the velocity diffusers predicts.
        sigma = t / (1 - t)
        x0 = pipe.denoiser(x / (1 - t)[:, None, None, None], sigma.double(), Cond(context=ctx, vector=pooled))
        expected_x0 = x - t[:, None, None, None] * expected
        assert _rel(x0, expected_x0) < 1e-4

    vae, _ = original_vae()
    assert pipe.autoencoder.latent_channels == 16
    assert pipe.autoencoder.config.scale_factor == 1.5305 and pipe.autoencoder.config.shift_factor == 0.0609
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(img).latent_dist.mean
        assert _rel(pipe.autoencoder.decode((z - 0.0609) * 1.5305), vae.decode(z).sample) < 1e-4
    with pytest.raises(ValueError, match="no text encoders"):
        pipe.generate("a red circle", steps=1, height=16, width=16)


@pytest.mark.parametrize("with_t5", [False, True])
def test_sd3_file_with_text_encoders_encodes_prompts_as_diffusers(with_t5, tmp_path, capsys):
    ref = tiny_sd3()
    folder, (tok1, tok2), clips = tiny_clips(tmp_path)
    tok3, t5 = tiny_t5(folder) if with_t5 else (None, None)
    path = tmp_path / "sd3_incl_text.safetensors"
    write_sd3_file(path, ref, clips, t5)
    with pytest.raises(ValueError, match="tokenizer"):
        read_single_file(path, overrides=OVERRIDES)
    pipe = latentdiff.load(path, tokenizer=folder, overrides=OVERRIDES)
    printed = capsys.readouterr().out
    assert "text_encoder: " in printed and "missing" not in printed
    assert ("no T5 in the file" in printed) != with_t5

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref_pipe = diffusers.StableDiffusion3Pipeline(transformer=ref, scheduler=sched, vae=original_vae()[0],
                                                  text_encoder=clips[0], tokenizer=tok1, text_encoder_2=clips[1],
                                                  tokenizer_2=tok2, text_encoder_3=t5, tokenizer_3=tok3)
    prompts = ["a red circle", ""]
    with torch.no_grad():
        embeds, _, pooled, _ = ref_pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
    cond = pipe.text_encoder(prompts)
    assert cond.context.shape == embeds.shape == (2, 16 + 256, 48)  # 16 CLIP tokens (tiny tokenizer) + 256 T5
    assert _rel(cond.context, embeds) < 1e-5 and _rel(cond.vector, pooled) < 1e-5
    assert (embeds[:, 16:].abs().amax() > 0.1) == with_t5  # T5's tokens are there, or zeros in their place


def test_sd3_file_with_clips_generates_diffusers_image(tmp_path, capsys):
    """End to end: the same seed, steps and guidance through diffusers' StableDiffusion3Pipeline (no T5)."""
    from latentdiff.diffusion import schedules

    ref = tiny_sd3()
    folder, (tok1, tok2), clips = tiny_clips(tmp_path)
    path = tmp_path / "sd3_incl_clips.safetensors"
    write_sd3_file(path, ref, clips)
    pipe = latentdiff.load(path, tokenizer=folder, overrides=OVERRIDES)
    printed = capsys.readouterr().out
    assert "schedule 'flow_match'" in printed and "shifted by 3" in printed

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    ours_grid = schedules.make_sigmas("flow_match", 4, pipe.denoiser.parameterization, shift=3.0)
    t = ours_grid / (1 + ours_grid)  # flow time; 1 at sigma = inf
    torch.testing.assert_close(torch.where(ours_grid.isinf(), 1.0, t), sched.sigmas.double(), atol=1e-6, rtol=0)

    ref_pipe = diffusers.StableDiffusion3Pipeline(transformer=ref, scheduler=sched, vae=original_vae()[0],
                                                  text_encoder=clips[0], tokenizer=tok1, text_encoder_2=clips[1],
                                                  tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None)
    ref_pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 4, "guidance_scale": 3.0, "height": 16, "width": 16}
    expected = ref_pipe("a red circle", generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images
    got = pipe.generate("a red circle", steps=4, sampler="euler", schedule="flow_match", guidance=3.0, seed=3,
                        height=16, width=16, output="pt")
    diff = ((got / 2 + 0.5).clamp(0, 1) - expected).abs().max().item()
    assert diff <= 1 / 255, f"max pixel difference {diff * 255:.2f}/255"


def test_sd3_file_converts_to_our_folder_and_to_a_diffusers_folder(tmp_path, capsys):
    from latentdiff.cli import main

    ref = tiny_sd3("rms_norm")
    folder, _, clips = tiny_clips(tmp_path)
    _, t5 = tiny_t5(folder)
    path = tmp_path / "sd35.safetensors"
    write_sd3_file(path, ref, clips, t5)
    common = ["--tokenizer", str(folder), "--overrides-json", json.dumps(OVERRIDES)]
    main(["convert", str(path), str(tmp_path / "ours"), *common])
    assert "detected sd35" in capsys.readouterr().out
    direct = latentdiff.load(path, tokenizer=folder, overrides=OVERRIDES)
    back = latentdiff.load(tmp_path / "ours")
    assert back.index.scheduler.flow_shift == 3.0 and back.text_encoder.config.encoders[2].kind == "t5"
    kw = {"steps": 2, "sampler": "euler", "schedule": "flow_match", "guidance": 2.0, "seed": 1, "height": 16,
          "width": 16, "output": "pt"}
    ours = direct.generate("a blue square", **kw)
    assert torch.equal(back.generate("a blue square", **kw), ours)

    # As a StableDiffusion3Pipeline folder: diffusers opens it and draws our image.
    main(["convert", str(path), str(tmp_path / "diffusers"), "--format", "diffusers", *common])
    capsys.readouterr()
    ref_pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "diffusers")
    ref_pipe.set_progress_bar_config(disable=True)
    expected = ref_pipe("a blue square", num_inference_steps=2, guidance_scale=2.0, height=16, width=16,
                        generator=torch.Generator().manual_seed(1), output_type="pt").images
    diff = ((ours / 2 + 0.5).clamp(0, 1) - expected).abs().max().item()
    assert diff <= 1 / 255, f"max pixel difference {diff * 255:.2f}/255"

    # Without text encoders there is no pipeline to write.
    bare = tmp_path / "bare.safetensors"
    write_sd3_file(bare, ref)
    with pytest.raises(SystemExit) as e:
        main(["convert", str(bare), str(tmp_path / "bare_diffusers"), "--format", "diffusers", *common])
    assert e.value.code == 2 and "without its text encoders" in capsys.readouterr().err
    assert not (tmp_path / "bare_diffusers").exists()


def test_sd3_diffusers_folder_with_t5_generates_diffusers_image(tmp_path, capsys):
    ref = tiny_sd3("rms_norm")
    folder, (tok1, tok2), clips = tiny_clips(tmp_path)
    tok3, t5 = tiny_t5(folder)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    diffusers.StableDiffusion3Pipeline(transformer=ref, scheduler=sched, vae=original_vae()[0], text_encoder=clips[0],
                                       tokenizer=tok1, text_encoder_2=clips[1], tokenizer_2=tok2, text_encoder_3=t5,
                                       tokenizer_3=tok3).save_pretrained(tmp_path / "sd3")
    ref_pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3")
    ref_pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 3, "guidance_scale": 4.0, "height": 16, "width": 16}
    expected = ref_pipe("a red circle", generator=torch.Generator().manual_seed(2), output_type="pt", **kw).images
    pipe = latentdiff.load(tmp_path / "sd3")
    printed = capsys.readouterr().out
    assert "detected sd35" in printed and "shifted by 3" in printed and "missing" not in printed
    assert "no text_encoder_3" not in printed and len(pipe.text_encoder.encoders) == 3
    got = pipe.generate("a red circle", steps=3, sampler="euler", schedule="flow_match", guidance=4.0, seed=2,
                        height=16, width=16, output="pt")
    diff = ((got / 2 + 0.5).clamp(0, 1) - expected).abs().max().item()
    assert diff <= 1 / 255, f"max pixel difference {diff * 255:.2f}/255"


def test_sd3_file_with_fp8_t5_loads_in_float32(tmp_path):
    """The '_t5xxlfp8' releases store T5 in float8_e4m3fn: loaded as the same values in float32."""
    from safetensors.torch import load_file, save_file

    folder, _, clips = tiny_clips(tmp_path)
    _, t5 = tiny_t5(folder)
    write_sd3_file(tmp_path / "full.safetensors", tiny_sd3(), clips, t5)
    fp8 = {k: v.to(torch.float8_e4m3fn) if k.startswith("text_encoders.t5xxl.") else v
           for k, v in load_file(tmp_path / "full.safetensors").items()}
    save_file(fp8, tmp_path / "fp8.safetensors")
    pipe = latentdiff.load(tmp_path / "fp8.safetensors", tokenizer=folder, overrides=OVERRIDES)
    ours = pipe.text_encoder.encoders[2].state_dict()
    for k in ("shared.weight", "encoder.block.1.layer.1.DenseReluDense.wo.weight"):
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], fp8["text_encoders.t5xxl.transformer." + k].float())
    assert torch.isfinite(pipe.text_encoder(["a red circle"]).context).all()


def test_sd3_file_with_missing_or_foreign_tensors_is_refused(tmp_path):
    ref = tiny_sd3()
    state = original_mmdit(ref.state_dict())
    state.update(original_vae()[1])
    gone = P + "joint_blocks.1.context_block.attn.qkv.weight"
    partial = {k: v for k, v in state.items() if k != gone}
    write_safetensors(tmp_path / "partial.safetensors", partial)
    with pytest.raises(ValueError, match=f"refusing a partial load.*missing 1 .*{gone}"):
        latentdiff.load(tmp_path / "partial.safetensors", overrides=OVERRIDES)
    extra = dict(state, **{P + "joint_blocks.0.x_block.attn.extra.weight": torch.zeros(2)})
    write_safetensors(tmp_path / "extra.safetensors", extra)
    with pytest.raises(ValueError, match="unused 1 .*attn.extra.weight"):
        latentdiff.load(tmp_path / "extra.safetensors", overrides=OVERRIDES)
    dual = dict(state, **{P + "joint_blocks.0.x_block.attn2.qkv.weight": torch.zeros(3)})
    write_safetensors(tmp_path / "dual.safetensors", dual)
    with pytest.raises(UnsupportedCheckpoint, match="SD 3.5 medium"):
        latentdiff.load(tmp_path / "dual.safetensors")
    no_vae = {k: v for k, v in state.items() if not k.startswith(VAE)}
    write_safetensors(tmp_path / "no_vae.safetensors", no_vae)
    with pytest.raises(UnsupportedCheckpoint, match="no autoencoder"):
        latentdiff.load(tmp_path / "no_vae.safetensors")

"""Editing (issue 16): img2img, inpainting by latent blending and outpainting, on tiny random models.

The proofs: strength 1 is text-to-image to the bit; img2img moves away from the input's autoencoder round trip as
the strength grows; with the denoiser's x0 estimate held on the image's latent outside the mask, every sampler
keeps the kept region on the image's noisy path (exactly for the ODE solvers, with the right noise level for the
ancestral and SDE ones) and lands on the image's latent, so the kept latents and (pasted back) pixels are the
input's exactly; an all-black mask gives the round trip; bad inputs are refused before any network runs.
Parity with diffusers' img2img pipeline is in test_interop_load.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _tiny import cli, one_thread, tiny_model_folder  # noqa: F401 (one_thread: autouse)
from PIL import Image

from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.editing import edit_start, keep_known, strength_sigmas
from latentdiff.diffusion.parameterization import make_parameterization
from latentdiff.diffusion.sampling import _CANONICAL, init_x
from latentdiff.diffusion.schedules import flow_sigmas, karras_sigmas
from latentdiff.edit_inputs import grown_latent_mask, latent_mask, paste_mask
from latentdiff.images import read_parameters, to_uint8
from latentdiff.model_index import ModelIndex
from latentdiff.pipeline import Pipeline, load

PROMPT = "a red circle"
GEN = {"steps": 4, "seed": 3, "guidance": 2.0}
DETERMINISTIC = ("euler", "heun", "ddim", "plms", "dpmpp_2m", "unipc")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("edit") / "model", 16)


@pytest.fixture(scope="module")
def pipes(folder):
    """The tiny eps model, and its network as a flow model (the grid starts at sigma = inf)."""
    eps = load(folder)
    flow = Pipeline(eps.autoencoder, Denoiser(eps.denoiser.network, make_parameterization("flow")), eps.text_encoder,
                    eps.index, name="flow")
    return {"eps": eps, "flow": flow}


@pytest.fixture(scope="module")
def picture():
    """A 16 px input image (uint8) with a few flat regions."""
    a = np.zeros((16, 16, 3), np.uint8)
    a[:] = (200, 180, 40)
    a[3:11, 2:9] = (20, 60, 220)
    a[9:15, 8:15] = (240, 30, 30)
    return a


def square_mask(size: int = 16, lo: int = 4, hi: int = 12) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[lo:hi, lo:hi] = 1
    return m


def round_trip_input(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1]."""
    return (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1).contiguous()


@torch.no_grad()
def round_trip(pipe, image: np.ndarray) -> torch.Tensor:
    return pipe.autoencoder.decode(pipe.autoencoder.encode(round_trip_input(image)))


# ------------------------------------------------------------------------------- the diffusion layer


def test_strength_keeps_the_grids_last_steps_as_diffusers_counts_them():
    sigmas = karras_sigmas(10, 0.03, 14.6)
    for strength, kept in ((1.0, 10), (0.6, 6), (0.75, 7), (0.25, 2), (0.1, 1), (0.7, 7)):
        tail = strength_sigmas(sigmas, strength)
        assert len(tail) == kept + 1 and torch.equal(tail, sigmas[10 - kept:])  # int(10 * 0.7) = 7 (7.000...01)
    with pytest.raises(ValueError, match=r"runs no step .* at least 0.1"):
        strength_sigmas(sigmas, 0.05)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            strength_sigmas(sigmas, bad)


@pytest.mark.parametrize("grid", ["karras", "flow"])
@pytest.mark.parametrize("name", sorted(_CANONICAL))
def test_every_sampler_keeps_the_known_region_on_the_images_path(name, grid):
    """x0_hat held on z0 where the mask is 0: the kept region is z0 + sigma * n at every step (n the start noise
    for the ODE solvers; a unit-variance mix for the ancestral and SDE ones) and ends on z0."""
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 4, 32, 32, generator=g)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1  # repaint the left half
    sigmas = karras_sigmas(6, 0.05, 10.0) if grid == "karras" else flow_sigmas(6)

    def model(x, sigma, cond=None):  # any denoiser: a made-up one
        return torch.tanh(x) * 2 - 0.3

    denoiser = keep_known(model, z0, mask)
    x = edit_start(init_x(noise, sigmas), noise, float(sigmas[0]), z0, mask, strength=1.0)
    seen = []
    sampler = _CANONICAL[name][0]
    out = sampler(denoiser, x, sigmas, None, generator=torch.Generator().manual_seed(1),
                  callback=lambda d: seen.append((d["x"].clone(), float(d["sigma"]))))
    kept = mask[0, 0] == 0
    for x_i, s in seen:
        if s == float("inf"):
            continue
        n = (x_i - z0)[..., kept] / s
        if name in DETERMINISTIC:
            torch.testing.assert_close(n, noise[..., kept], atol=2e-5, rtol=1e-5)
        assert abs(float(n.std()) - 1) < 0.08 and abs(float(n.mean())) < 0.08, (s, n.std(), n.mean())
    torch.testing.assert_close(out[..., kept], z0[..., kept], atol=5e-5, rtol=1e-5)
    assert (out[..., ~kept] - z0[..., ~kept]).abs().mean() > 0.1  # the repainted half did move


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_an_early_grown_mask_frees_the_ring_while_noise_dominates_then_lands_on_the_image(name):
    """keep_known's ``early`` mask: x0_hat is the model's in the grown ring while sigma > until, z0 after; the
    ring ends on z0 and the cells beyond it stay on the image's path throughout."""
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3:5, 3:5] = 1
    early = grown_latent_mask(mask, 1)
    ring = (early[0, 0] == 1) & (mask[0, 0] == 0)
    assert ring.sum() == 12 and early[0, 0, 2:6, 2:6].eq(1).all() and early.sum() == 16
    assert torch.equal(grown_latent_mask(mask, 0), mask)
    model = lambda x, sigma, cond=None: torch.tanh(x) * 2 - 0.3
    denoiser = keep_known(model, z0, mask, early=early, until=1.0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    high, low = denoiser(x, torch.tensor(3.0)), denoiser(x, torch.tensor(0.5))
    torch.testing.assert_close(high[..., ring], model(x, None)[..., ring])  # free while noise dominates
    torch.testing.assert_close(low[..., ring], z0[..., ring])  # held on the image after
    both = denoiser(x.repeat(2, 1, 1, 1), torch.tensor([3.0, 0.5]))  # per-sample sigmas
    torch.testing.assert_close(both, torch.cat([high, low]))
    sigmas = flow_sigmas(8)
    start = edit_start(init_x(noise, sigmas), noise, float(sigmas[0]), z0, mask, strength=1.0)
    out = _CANONICAL[name][0](denoiser, start, sigmas, None, generator=torch.Generator().manual_seed(1))
    outside = early[0, 0] == 0
    torch.testing.assert_close(out[..., outside], z0[..., outside], atol=5e-5, rtol=1e-5)
    if name in DETERMINISTIC:  # an ODE step with x0_hat = z0 lands on z0 at sigma = 0
        torch.testing.assert_close(out[..., ring], z0[..., ring], atol=5e-5, rtol=1e-5)


def test_masks_soft_edges():
    mask = square_mask()[None, None]
    m = latent_mask(mask, 2)
    assert m.shape == (1, 1, 8, 8) and m[0, 0, 2:6, 2:6].eq(1).all()  # every repainted cell fully free
    assert (m[0, 0, 1:7, 1:7] > 0).all() and m[0, 0, 1, 1] < 1  # a soft ring one latent wide
    assert m[0, 0, 0].eq(0).all() and m[0, 0, :, 7].eq(0).all()  # beyond it: kept
    # A mask that ends partway through a cell frees that cell whole (an object's corner lies there), and keeps
    # the cells it does not touch.
    part = torch.zeros(1, 1, 24, 24)
    part[..., 5:11, 5:11] = 1  # a quarter of cell 1's pixels, three quarters of cell 2's
    m = latent_mask(part, 4)
    assert m[0, 0, 1:3, 1:3].eq(1).all() and 0 < m[0, 0, 0, 0] < 1 and 0 < m[0, 0, 3, 3] < 1
    assert m[0, 0, 4:].eq(0).all() and m[0, 0, :, 4:].eq(0).all()
    p = paste_mask(mask, 2)
    assert p[mask == 0].eq(0).all()  # outside the mask: the input's pixels exactly
    assert p[0, 0, 8, 8] == 1 and 0.4 < p[0, 0, 4, 8] < 1  # inside: fading in from the edge


# ------------------------------------------------------------------------------- img2img


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_strength_one_is_text_to_image(pipes, picture, kind):
    """strength 1 starts from the noise text-to-image starts from (not the image plus noise): the same image."""
    pipe = pipes[kind]
    txt = pipe.generate(PROMPT, sampler="euler", output="pt", **GEN)
    edit = pipe.generate(PROMPT, sampler="euler", output="pt", image=picture, strength=1.0, **GEN)
    assert torch.equal(txt, edit)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_img2img_moves_away_from_the_input_as_strength_grows(pipes, picture, kind):
    """On a fixed seed, the distance to the input's autoencoder round trip grows with the strength, in pixels and
    in latents; a light edit's latent stays near the input's (the random decoder amplifies any change in pixels)."""
    pipe = pipes[kind]
    with torch.no_grad():
        z0 = pipe.autoencoder.encode(round_trip_input(picture))
        ref = pipe.autoencoder.decode(z0)
    latent, pixels = [], []
    for strength in (0.1, 0.3, 0.6, 1.0):
        z = pipe.generate(PROMPT, sampler="euler", output="latent", image=picture, strength=strength,
                          **{**GEN, "steps": 10})
        latent.append(float((z - z0).abs().mean()))
        with torch.no_grad():
            pixels.append(float((pipe.autoencoder.decode(z) - ref).abs().mean()))
    assert latent == sorted(latent) and pixels == sorted(pixels), (latent, pixels)
    assert latent[0] < 0.3 * latent[-1], latent


# ------------------------------------------------------------------------------- inpainting, outpainting


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_inpainting_keeps_the_unmasked_latents_and_pixels_exactly(pipes, picture, kind, sampler):
    pipe = pipes[kind]
    mask = square_mask()
    kw = {**GEN, "sampler": sampler, "image": picture, "mask": mask, "num_images": 2}
    z = pipe.generate(PROMPT, output="latent", **kw)
    z0 = pipe.generate(PROMPT, output="latent", **{**kw, "mask": torch.zeros(16, 16)})  # nothing repainted
    torch.testing.assert_close(z0[:1], pipe.autoencoder.encode(round_trip_input(picture)))  # the image's latent
    kept = latent_mask(mask[None, None], pipe.autoencoder.factor)[0, 0] == 0
    assert kept.sum() == 28 and torch.equal(z[..., kept], z0[..., kept])
    assert (z[..., ~kept] - z0[..., ~kept]).abs().mean() > 0.05  # the masked part was repainted
    images = pipe.generate(PROMPT, output="np", **kw)
    outside = (mask == 0).numpy()
    assert (images[:, outside] == picture[outside]).all()  # pasted back: the input's own pixels
    unpasted = pipe.generate(PROMPT, output="np", paste_back=False, **kw)
    assert (unpasted[:, outside] != picture[outside]).any()  # ... which decoding alone does not give


def test_all_black_mask_gives_the_round_trip(pipes, picture):
    pipe = pipes["eps"]
    kw = {**GEN, "sampler": "dpmpp_2m", "image": picture, "mask": np.zeros((16, 16), np.uint8)}
    torch.testing.assert_close(pipe.generate(PROMPT, output="pt", paste_back=False, **kw), round_trip(pipe, picture))
    assert (pipe.generate(PROMPT, output="np", **kw)[0] == picture).all()


@pytest.mark.parametrize("network", ["dit", "mmdit"])
def test_inpainting_and_img2img_on_transformers(pipes, picture, network):
    """Nothing in editing depends on the network: a DiT and an MMDiT (flow) inpaint and img2img the same way."""
    from latentdiff.models.dit import DiT, DiTConfig
    from latentdiff.models.mmdit import MMDiT, MMDiTConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig(sample_size=8, hidden_size=16, depth=1, num_heads=2, context_dim=16, vector_dim=16)) \
        if network == "dit" else MMDiT(MMDiTConfig(in_channels=4, sample_size=8, hidden_size=16, depth=1, num_heads=2,
                                                   context_dim=16, vector_dim=16, pos_embed_max_size=8))
    for p in net.parameters():  # zero-initialized outputs would make every estimate the same
        p.data.normal_(0, 0.2)
    eps = pipes["eps"]
    pipe = Pipeline(eps.autoencoder, Denoiser(net.eval(), make_parameterization("flow")), eps.text_encoder,
                    ModelIndex(sample_size=16))
    images = pipe.generate(PROMPT, output="np", image=picture, mask=square_mask(), **GEN)
    assert (images[0][square_mask() == 0] == picture[square_mask() == 0]).all()
    assert images.shape == (1, 16, 16, 3)
    assert pipe.generate(PROMPT, output="np", image=picture, strength=0.5, **GEN).shape == (1, 16, 16, 3)


def test_outpainting_repaints_the_border_and_keeps_the_image(pipes, picture):
    pipe = pipes["eps"]
    out = pipe.generate(PROMPT, output="np", image=picture, outpaint=(4, 0, 8, 4), **GEN)
    assert out.shape == (1, 20, 28, 3)
    assert (out[0, :16, 4:20] == picture).all()  # the image itself, pasted back
    border = out[0, :, 20:].astype(float)
    assert np.abs(border - picture[:, -1:].mean(0)).mean() > 5  # not just the repeated edge it started from
    z = pipe.generate(PROMPT, output="latent", image=picture, outpaint=(4, 0, 8, 4), **GEN)
    assert z.shape == (1, 4, 10, 14)


# ------------------------------------------------------------------------------- bad input


def test_bad_edit_inputs_are_refused_before_any_network_runs(pipes, picture, capsys):
    pipe = pipes["eps"]
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1))
             for m in (pipe.denoiser.network, pipe.autoencoder.encoder, pipe.text_encoder)]
    grey = np.full((16, 16), 100, np.uint8)
    cases = [
        ({"image": picture, "strength": 0.0}, r"strength = 0.0 is not allowed: strength must be in \(0, 1\]"),
        ({"image": picture, "strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"image": picture, "strength": 0.1}, r"strength 0.1 of 4 steps runs no step"),
        ({"mask": square_mask()}, "mask given without an image"),
        ({"strength": 0.5, "outpaint": (2, 0, 0, 0)}, "outpaint and strength given without an image"),
        ({"image": picture, "outpaint": (-2, 0, 0, 0)}, "outpaint must be >= 0"),
        ({"image": picture, "outpaint": (3, 0, 0, 0)}, r"left=3: each side must be a non-negative multiple of .* 2"),
        ({"image": picture, "outpaint": (0, 0, 0, 0)}, "adds no pixels"),
        ({"image": picture, "outpaint": (2, 2)}, r"outpaint = \(2, 2\) is not a valid tuple"),
        ({"image": picture, "height": 16, "width": 32}, r"image is 16x16 but the requested size is 32x16"),
        ({"image": picture, "mask": np.zeros((16, 24), np.uint8)}, "mask is 24x16 but the image is 16x16"),
        ({"image": picture, "mask": torch.full((16, 16), 2.0)}, r"mask's values must lie in \[0, 1\]"),
        ({"image": picture, "mask": square_mask(), "mask_grow": -1}, r"mask_grow must be a whole number .*\[0, 16\]"),
        ({"image": picture, "mask": square_mask(), "mask_grow": 1.5}, "mask_grow must be a whole number"),
        ({"image": picture * 1.0}, "image array must be uint8"),
        ({"image": torch.full((3, 16, 16), 255.0)}, r"in \[-1, 1\].*\[0, 255\]"),
        ({"image": torch.zeros(2, 3, 16, 16)}, r"\(one image\)"),
        ({"image": "no/such/file.png"}, "no image file"),
        ({"image": picture, "height": 17}, "multiples of the autoencoder's factor 2"),
        ({"image": picture, "mask": grey, "outpaint": (2, 2, 2, 2), "height": 4, "width": 4}, "leaves the image"),
    ]
    for kw, message in cases:
        with pytest.raises((ValueError, OSError), match=message):
            pipe.generate(PROMPT, **{**GEN, **kw})
    for h in hooks:
        h.remove()
    assert not calls


def test_resizing_and_thresholding_are_said(pipes, picture, capsys):
    pipe = pipes["eps"]
    big = np.asarray(Image.fromarray(picture).resize((20, 20)))
    grey = np.zeros((32, 32), np.uint8)
    grey[8:24, 8:24] = 255
    grey[8:24, 8] = 140  # a grey edge, as a resized or JPEG mask has
    out = pipe.generate(PROMPT, output="np", image=big, mask=grey, height=16, width=16, **GEN)
    err = capsys.readouterr().err
    assert "image 20x20 resized to 16x16 (the requested size)" in err
    assert "mask 32x32 resized to 20x20 (the image)" in err
    assert err.count("thresholded at 0.5") == 1 and "16 of 1024 pixels grey" in err
    assert out.shape == (1, 16, 16, 3)
    own = pipe.generate(PROMPT, output="np", image=np.zeros((17, 15, 3), np.uint8), **GEN)  # rounded to the factor
    assert own.shape == (1, 16, 16, 3) and "image 15x17 resized to 16x16" in capsys.readouterr().err


# ------------------------------------------------------------------------------- command line


def test_cli_edits_write_pngs_that_record_the_edit(folder, picture, tmp_path):
    Image.fromarray(picture).save(tmp_path / "in.png")
    Image.fromarray((square_mask().numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    base = ["generate", PROMPT, "--model", str(folder), "--steps", "4", "--image", "in.png"]
    runs = {"img2img.png": ["--strength", "0.5"], "inpaint.png": ["--mask", "mask.png"],
            "outpaint.png": ["--outpaint", "left=4,bottom=4", "--no-paste-back"]}
    for out, extra in runs.items():
        result = cli([*base, *extra, "-o", out], tmp_path)
        assert result.returncode == 0, result.stderr
    params = {name: read_parameters(tmp_path / name) for name in runs}
    assert params["img2img.png"]["image"] == str(tmp_path / "in.png") and params["img2img.png"]["strength"] == 0.5
    assert "mask" not in params["img2img.png"]
    assert params["inpaint.png"]["mask"] == str(tmp_path / "mask.png") and params["inpaint.png"]["strength"] == 1.0
    assert params["outpaint.png"]["outpaint"] == {"left": 4, "top": 0, "right": 0, "bottom": 4}
    assert params["outpaint.png"]["paste_back"] is False and params["outpaint.png"]["width"] == 20
    inpainted = np.asarray(Image.open(tmp_path / "inpaint.png"))
    assert (inpainted[square_mask().numpy() == 0] == picture[square_mask().numpy() == 0]).all()
    assert json.dumps(params)  # plain JSON values


def test_cli_refuses_bad_edits_with_one_line_and_writes_nothing(folder, picture, tmp_path):
    from test_reliability import refuse_all

    root = tmp_path / "watched"
    root.mkdir()
    Image.fromarray(picture).save(root / "in.png")
    Image.fromarray(np.zeros((16, 40), np.uint8)).save(root / "wide.png")
    (root / "junk.png").write_text("not an image")
    gen = ["generate", PROMPT, "--model", str(folder), "--steps", "2", "-o", str(root / "out.png")]
    image = ["--image", str(root / "in.png")]
    cases = [
        ({"argv": [*gen, *image, "--strength", "0"]}, ("strength = 0.0 is not allowed", "(0, 1]")),
        ({"argv": [*gen, *image, "--strength", "1.2"]}, ("strength must be in (0, 1]",)),
        ({"argv": [*gen, "--mask", str(root / "in.png")]}, ("--image FILE",)),
        ({"argv": [*gen, *image, "--outpaint", "left=-2"]}, ("outpaint must be >= 0",)),
        ({"argv": [*gen, *image, "--outpaint", "left=3"]}, ("left=3", "multiple of the autoencoder's factor 2")),
        ({"argv": [*gen, *image, "--outpaint", "middle=2"]}, ("--outpaint 'middle=2'", "left, top, right, bottom")),
        ({"argv": [*gen, *image, "--mask", str(root / "wide.png")]}, ("mask is 40x16 but the image is 16x16",)),
        ({"argv": [*gen, "--image", str(root / "nothing.png")]}, ("nothing.png", "check the path")),
        ({"argv": [*gen, "--image", str(root / "junk.png")]}, ("junk.png cannot be read as an image",)),
    ]
    refuse_all(cases, root, tmp_path)


def test_the_pipelines_float_pixels_round_trip_as_an_image(pipes):
    """An image given as generate(output="pt")'s tensor (which may overshoot [-1, 1] a little) is taken as is."""
    pipe = pipes["eps"]
    pt = pipe.generate(PROMPT, output="pt", **GEN)
    out = pipe.generate(PROMPT, output="np", image=pt, mask=square_mask(), **GEN)
    outside = (square_mask() == 0).numpy()
    assert (out[0][outside] == to_uint8(pt.clamp(-1, 1))[0][outside]).all()


def test_a_size_the_denoiser_cannot_take_is_refused_before_work(tmp_path):
    """The latent must fit the network's own downsampling, not only the autoencoder's factor."""
    from _tiny import tiny_model_folder

    pipe = load(tiny_model_folder(tmp_path / "m"))  # factor 2, a 2-level U-Net: sides multiples of 4
    with pytest.raises(ValueError, match="multiples of 4 for this model"):
        pipe.generate("a red circle", steps=2, height=18, width=16)
    assert pipe.generate("a red circle", steps=2, height=20, width=16, output="pt").shape[-2:] == (20, 16)

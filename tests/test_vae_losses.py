"""LPIPS (layout, loading from local files), PatchGAN, hinge loss, Esser et al.'s adaptive weight, and the
GAN + perceptual terms inside train-vae (with a discriminator start step and resume)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_models import one_thread  # noqa: F401 (an autouse fixture)

from latentdiff.cli import main
from latentdiff.models.autoencoder import detail_loss, edge_loss
from latentdiff.models.perceptual import (
    LPIPS,
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_d_loss,
    load_lpips,
    vgg16_features,
)


def random_lpips_state(seed=0) -> dict:
    torch.manual_seed(seed)
    model = LPIPS()
    for p in model.parameters():
        p.data.normal_(0, 0.05).abs_()
    return model.state_dict()


def test_lpips_has_taming_key_names_and_vgg_slices():
    keys = set(LPIPS().state_dict())
    for k in ("scaling_layer.shift", "net.slice1.0.weight", "net.slice2.5.weight", "net.slice3.14.bias",
              "net.slice5.28.weight", "lin0.model.1.weight", "lin4.model.1.weight"):
        assert k in keys, k
    assert len([k for k in keys if k.startswith("net.")]) == 26  # 13 convs, weight + bias
    # Each slice ends at torchvision's relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    model = LPIPS()
    features = vgg16_features()
    features.load_state_dict({k.split(".", 2)[2]: v for k, v in model.state_dict().items() if k.startswith("net.")})
    x = torch.randn(1, 3, 32, 32)
    outs = model.net(x)
    for out, end in zip(outs, (4, 9, 16, 23, 30)):
        torch.testing.assert_close(out, features[:end](x))


def test_lpips_loads_from_local_files_and_measures(tmp_path):
    state = random_lpips_state()
    save_file(state, str(tmp_path / "lpips_full.safetensors"))
    # The usual shipping form: LPIPS's linear layers (a .pth) + torchvision VGG16 weights with its own names.
    lin = {k: v for k, v in state.items() if k.startswith("lin")}
    torch.save(lin, tmp_path / "vgg.pth")
    tv = {}
    for k, v in state.items():
        if k.startswith("net."):
            _, _, idx, kind = k.split(".")
            tv[f"features.{idx}.{kind}"] = v
    tv["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's head, ignored
    save_file(tv, str(tmp_path / "vgg16.safetensors"))
    a = load_lpips(tmp_path / "lpips_full.safetensors")
    b = load_lpips(tmp_path / "vgg.pth", tmp_path / "vgg16.safetensors")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(a(x, y), b(x, y))
    assert a(x, x).abs().max() < 1e-6 and (a(x, y) > 0).all()
    assert a(x, y)[0] < a(x, -x)[0]  # farther images, larger distance (here: for these weights)
    with pytest.raises(ValueError, match="refusing a partial load.*missing"):
        load_lpips(tmp_path / "vgg.pth")  # linear layers without the VGG
    with pytest.raises(FileNotFoundError, match="LPIPS weights"):
        load_lpips(tmp_path / "nope.pth")


def test_patch_discriminator_layout_and_receptive_field():
    d = PatchDiscriminator(3, 8, n_layers=3)
    # taming's NLayerDiscriminator indices: conv, lrelu, (conv, bn, lrelu) x 3, conv.
    convs = [k for k in d.state_dict() if k.endswith("weight")]
    assert convs == ["main.0.weight", "main.2.weight", "main.3.weight", "main.5.weight", "main.6.weight",
                     "main.8.weight", "main.9.weight", "main.11.weight"]
    assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # pix2pix's 70x70 PatchGAN on 256 px


def test_hinge_loss_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1] -> 0.5; half the sum.
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 3)
    nll = (x @ w.t()).pow(2).mean()
    g = 3.0 * (x @ w.t()).sum()
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    assert adaptive_gan_weight(nll, g, w).item() == pytest.approx((gn / (gg + 1e-4)).item(), rel=1e-6)
    assert not adaptive_gan_weight(nll, g, w).requires_grad


def test_train_vae_with_gan_lpips_and_disc_start_resumes(tmp_path, capsys):
    save_file(random_lpips_state(), str(tmp_path / "lpips.safetensors"))
    common = ["--preset", "shapes-test", "--set", "image_size=16", "--set", "disc_weight=0.5",
              "--set", "disc_start=2", "--set", "disc_channels=8", "--set", "disc_layers=2", "--set", f"lpips_path={tmp_path / 'lpips.safetensors'}",
              "--set", "save_every=2"]
    out = tmp_path / "gan"
    main(["train-vae", "--out", str(out), *common, "--steps", "2"])
    main(["train-vae", "--out", str(out), *common, "--steps", "4", "--resume"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    assert "g_loss" not in by_step[2] and "lpips" in by_step[2]  # before disc_start: no GAN terms
    assert {"g_loss", "d_loss", "d_weight", "lpips"} <= set(by_step[4])
    # The resumed run is the uninterrupted one: autoencoder and discriminator (and its optimizer) carry over.
    main(["train-vae", "--out", str(tmp_path / "straight"), *common, "--steps", "4"])
    for name in ("model.safetensors", "ema.safetensors", "discriminator.safetensors"):
        resumed = load_file(str(out / "checkpoints" / "step_0000004" / name))
        straight = load_file(str(tmp_path / "straight" / "checkpoints" / "step_0000004" / name))
        assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed), name
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["d_loss"] for r in straight_rows if r["step"] > 2] == [by_step[s]["d_loss"] for s in (3, 4)]
    # Without LPIPS weights the run says so and trains without a perceptual term.
    main(["train-vae", "--out", str(tmp_path / "plain"), "--preset", "shapes-test", "--set", "image_size=16",
          "--set", "quiet=false", "--steps", "1"])
    assert "no LPIPS weights given" in capsys.readouterr().err


def test_weights_gone_non_finite_never_reach_a_checkpoint(tmp_path, monkeypatch, capsys):
    """A step that leaves NaN weights stops the run with a message; the last good checkpoint stays whole."""
    from latentdiff.components import load_autoencoder
    from latentdiff.train.common import find_checkpoint

    out = tmp_path / "run"
    args = ["train-vae", "--preset", "shapes-test", "--set", "image_size=16", "--out", str(out)]
    main([*args, "--steps", "2"])
    good = find_checkpoint(out)
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *a, **kw):
        result = real_step(self, *a, **kw)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(SystemExit) as e:
        main([*args, "--steps", "4", "--resume"])
    assert e.value.code == 2
    assert "weights became non-finite" in capsys.readouterr().err
    assert find_checkpoint(out) == good  # latest still points at step 2
    ae = load_autoencoder(out / "autoencoder")  # the autoencoder from the good run is untouched
    assert all(torch.isfinite(p).all() for p in ae.state_dict().values())


def test_edge_loss_sees_edges_not_levels():
    """The loss on neighbour differences: blind to a uniform offset, and it measures a blurred edge."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    assert edge_loss(images + 0.3, images, "l2") == pytest.approx(0.0, abs=1e-12)  # same edges, other level
    step = torch.zeros(1, 1, 4, 4)
    step[..., 2:] = 1.0  # a vertical edge: each row has differences (0, 1, 0)
    ramp = torch.zeros(1, 1, 4, 4)
    ramp[..., 1], ramp[..., 2:] = 0.5, 1.0  # the same edge blurred over two pixels: (0.5, 0.5, 0)
    # L1: |0.5 - 0| + |0.5 - 1| + 0 = 1 per row over 12 horizontal differences; vertical differences all 0.
    assert edge_loss(ramp, step, "l1").item() == pytest.approx((1 / 3 + 0) / 2)


def test_detail_loss_weights_errors_by_local_contrast():
    """Flat areas weigh nothing, an edge pixel weighs its distance from its 3x3 mean; a perfect copy costs 0."""
    flat = torch.full((1, 3, 6, 6), 0.4)
    assert detail_loss(flat + 0.5, flat, "l2").item() < 1e-7  # an error on a flat area is left to the plain loss
    step = torch.zeros(1, 1, 3, 3)
    step[..., 2] = 1.0  # a vertical edge; zero padding is not counted in the 3x3 means
    assert detail_loss(step, step, "l1").item() == 0.0
    # Centre pixel: 0 against its neighbourhood mean 3/9; an error of 1 there, weighted 1/3, over 9 pixels.
    err = torch.zeros(1, 1, 3, 3)
    err[..., 1, 1] = 1.0
    assert detail_loss(step + err, step, "l1").item() == pytest.approx(1 / 3 / 9)
    with pytest.raises(ValueError, match="recon"):
        detail_loss(step, step, "huber")


def test_train_vae_edge_term_and_channels_last_change_nothing_else(tmp_path):
    """edge_weight adds a logged term; the channels-last layout trains the same weights as the plain one."""
    from safetensors.torch import load_file

    base = ["--preset", "shapes-test", "--set", "image_size=16", "--steps", "2", "--set", "save_every=1",
            "--set", "keep_last=2"]
    main(["train-vae", "--out", str(tmp_path / "nhwc"), *base, "--set", "channels_last=true"])
    main(["train-vae", "--out", str(tmp_path / "nchw"), *base])
    main(["train-vae", "--out", str(tmp_path / "edge"), *base, "--set", "edge_weight=1.0", "--set",
          "detail_weight=1.0"])
    a, b, before = (load_file(str(tmp_path / r / "checkpoints" / f"step_{s:07d}" / "model.safetensors"))
                    for r, s in (("nhwc", 2), ("nchw", 2), ("nchw", 1)))
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    moved = torch.cat([(a[k] - before[k]).flatten() for k in a])
    assert diff.abs().max() < 1e-3 and diff.norm() < 0.02 * moved.norm(), (diff.abs().max(), diff.norm(), moved.norm())
    rows = [json.loads(line) for line in (tmp_path / "edge" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["edge"] > 0 and r["detail"] > 0 for r in rows) and all("edge" not in json.loads(line) for line in
                                                    (tmp_path / "nhwc" / "metrics.jsonl").read_text().splitlines())

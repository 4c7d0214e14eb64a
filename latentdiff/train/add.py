"""Adversarial diffusion distillation (ADD, Sauer et al. 2023, "Adversarial Diffusion Distillation": SDXL Turbo),
the parts ``train/distill.py``'s loop uses for ``method = "add"``.

In sigma coordinates (x = x0 + sigma * eps; DESIGN.md), per sample, with the teacher's own grid (``teacher_grid``)
and the student's few levels s_1 > ... > s_K (the 'lcm' grid's K points, e.g. flow t = 1, 0.76, 0.5, 0.26):

    x0 from the cache, eps ~ N(0, I), s ~ U{s_1, ..., s_K}
    x0_hat  = f_theta(x0 + s eps, s)                              the student's x0 estimate (s = inf: eps itself)
    t ~ U(teacher grid, boundary and inf excluded), eps' ~ N(0, I)
    target  = D_w(x0_hat + t eps', t), no gradient               the teacher's CFG estimate of the re-noised x0_hat
    L_dist  = c(t) mean (x0_hat - target)^2                      c(t) = alpha_t = 1 / sqrt(1 + t^2) (ADD), or 1
    sigma_d ~ U(teacher grid, finite, <= disc_sigma_max), eps_d ~ N(0, I)
    L_adv   = -mean D(x0_hat + sigma_d eps_d, sigma_d, c)          the generator's hinge term
    L_G     = adv_weight L_adv + distill_weight L_dist            (ADD: 1 and 2.5)
    L_D     = mean relu(1 - D(real)) + mean relu(1 + D(fake))     real: x0 itself, both at the same sigma_d, eps_d

D is a frozen feature network with small trained heads (ADD: DINOv2 ViT-S features, heads conditioned on the text
embedding by projection). Ours reads the frozen teacher U-Net's encoder features of the re-noised latent, as
"Latent Adversarial Diffusion Distillation" (Sauer et al. 2024, SD3 Turbo) does: it works for any latent model
(medical, satellite, spectrograms) with no pixel network, no decoding and no backward through a decoder; it is
text-conditioned already through its cross-attention; and it is not the feature net our FID uses, so the student is
not trained against its own evaluation. The heads (``DiscriminatorHeads``) are a small conv
stack per feature map with a projection term on the pooled text embedding; they and their optimizer are the run
engine's ``extra`` modules, so resume is bitwise as for every loop. The discriminator steps right after the
student's step on this step's pairs (features computed once, before the student's update).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.schedules import make_sigmas
from latentdiff.models.perceptual import hinge_d_loss
from latentdiff.train.common import NonFiniteSkipper
from latentdiff.train.distributed import per_sample
from latentdiff.types import Cond

WEIGHTINGS = ("alpha", "uniform")


def student_levels(parameterization, steps: int, grid_steps: int) -> Tensor:
    """The student's noise levels, descending: the 'lcm' grid's ``steps`` points before its 0 (on a 1000-step model
    timesteps 999, 759, 499, 259 at 4 of 50; flow t = 1, 0.76, 0.5, 0.26), which hold its 1- and 2-step grids."""
    return make_sigmas("lcm", steps, parameterization, original_steps=grid_steps)[:-1]


def level_probabilities(weights: tuple[float, ...], n: int) -> Tensor:
    """The probability of drawing each of the student's ``n`` levels (highest first): ``weights`` normalized, or
    uniform when empty."""
    p = torch.tensor(weights, dtype=torch.float64) if weights else torch.ones(n, dtype=torch.float64)
    return p / p.sum()


def draw_level(p: Tensor, g: torch.Generator) -> Tensor:
    """One level index (shape (1,)) drawn with probabilities ``p`` from ``g``. Uniform ``p`` draws with ``randint``,
    so runs without level weights keep their random stream (and their checkpoints resume bitwise)."""
    if bool((p == p[0]).all()):
        return torch.randint(len(p), (1,), generator=g)
    return torch.multinomial(p, 1, generator=g)


def distill_weight(sigma: Tensor, kind: str) -> Tensor:
    """ADD's c(t): alpha_t = 1 / sqrt(1 + sigma^2) (the signal scale of the variance-preserving x_t), or 1."""
    if kind == "uniform":
        return torch.ones_like(sigma)
    return 1.0 / torch.sqrt(1.0 + sigma.double() ** 2)


def distillation_loss(x0_hat: Tensor, target: Tensor, sigma: Tensor, kind: str = "alpha") -> Tensor:
    """Per sample c(t) * mean (x0_hat - target)^2, the teacher's ``target`` held fixed."""
    d = ((x0_hat.float() - target.detach().float()) ** 2).flatten(1).mean(1)
    return distill_weight(sigma, kind).to(d) * d


def at_level(x0: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """x0 + sigma * noise per sample, sigma (B,) finite."""
    return x0 + sigma.to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1))) * noise


def pooled(cond: Cond) -> Tensor:
    """The text condition as one vector per sample: the pooled ``vector``, else the mean of the real context tokens."""
    if cond.vector is not None and cond.vector.is_floating_point():
        return cond.vector.float()
    if cond.context is None:
        raise ValueError("the discriminator's projection needs a text condition (cond.vector or cond.context)")
    mask = cond.context_mask
    if mask is None:
        return cond.context.float().mean(1)
    m = mask.to(cond.context.dtype)[..., None]  # (B, L, 1)
    return ((cond.context * m).sum(1) / m.sum(1).clamp(min=1)).float()


class DiscriminatorHeads(nn.Module):
    """ADD's trained discriminator heads: per feature map a small conv stack giving a logit per location, plus a
    projection term <h, P c> on the text embedding c (Miyato & Koyama 2018). No spectral norm (ADD's heads have it):
    on these small features it held the logits near 0 and the hinge loss near 1 for hundreds of steps."""

    def __init__(self, channels: list[int], cond_dim: int, hidden: int = 64, groups: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.GroupNorm(math.gcd(groups, c), c), nn.SiLU(), nn.Conv2d(c, hidden, 1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU()) for c in channels)
        self.out = nn.ModuleList(nn.Conv2d(hidden, 1, 1) for _ in channels)
        self.proj = nn.ModuleList(nn.Linear(cond_dim, hidden) for _ in channels)
        self.hidden = hidden

    def forward(self, features: list[Tensor], c: Tensor) -> Tensor:
        """Feature maps (B, C_i, h_i, w_i) and text embeddings (B, cond_dim) -> logits (B, sum_i h_i w_i)."""
        logits = []
        for f, block, out, proj in zip(features, self.blocks, self.out, self.proj, strict=True):
            h = block(f.float())  # (B, hidden, h, w)
            p = (h * proj(c)[:, :, None, None]).sum(1, keepdim=True) / math.sqrt(self.hidden)  # (B, 1, h, w)
            logits.append((out(h) + p).flatten(1))
        return torch.cat(logits, dim=1)


def generator_hinge(logits_fake: Tensor) -> Tensor:
    """The generator's hinge term per sample: -mean D(fake)."""
    return -logits_fake.flatten(1).mean(1)


class Discriminator:
    """ADD's discriminator: the frozen teacher U-Net's encoder features of a re-noised latent with trained heads;
    the generator's term for the student's loss and its own hinge step, with its own optimizer."""

    def __init__(self, teacher: Denoiser, heads: DiscriminatorHeads, lr: float, grad_clip: float, verbose: bool,
                 frozen: Callable[[], AbstractContextManager] = nullcontext):
        self.teacher, self.heads, self.grad_clip = teacher, heads, grad_clip
        self.opt = torch.optim.AdamW(heads.parameters(), lr=lr, betas=(0.0, 0.99))  # ADD / StyleGAN-T: beta1 0
        self.skipper = NonFiniteSkipper(verbose=verbose)
        self.frozen = frozen  # the context in which the network is the teacher's (an LCM-LoRA's adapters off)
        self.pairs: list[tuple[list[Tensor], list[Tensor], Tensor]] = []  # this step's (real, fake) features, c

    def checkpointed(self) -> dict:
        """The heads and their optimizer, kept in the training checkpoints (the run engine's ``extra``)."""
        return {"discriminator": self.heads, "disc_optimizer": self.opt}

    def features(self, x0: Tensor, sigma: Tensor, noise: Tensor, cond: Cond) -> list[Tensor]:
        """The teacher network's encoder features of x0 + sigma * noise at sigma (its own input scaling)."""
        x = at_level(x0, sigma, noise)
        _, _, c_in, c_noise = self.teacher.scalings(x, sigma)
        with self.frozen():
            return self.teacher.network.encoder_features(c_in * x, c_noise, cond)

    def generator_loss(self, fake: Tensor, real: Tensor, sigma: Tensor, noise: Tensor, cond: Cond) -> Tensor:
        """-mean D(fake) per sample, gradient to ``fake`` only; keeps both sides' features for ``step``."""
        c = pooled(cond)
        with torch.no_grad():
            real_f = self.features(real, sigma, noise, cond)
        fake_f = self.features(fake, sigma, noise, cond)
        self.heads.requires_grad_(False)
        loss = generator_hinge(self.heads(fake_f, c))
        self.heads.requires_grad_(True)
        self.pairs.append(([f.detach() for f in real_f], [f.detach() for f in fake_f], c.detach()))
        return loss

    def step(self, step: int, generator_stepped: bool) -> Tensor | None:
        """The hinge loss on this step's pairs and the heads' optimizer step (None: no pairs, or a skipped step)."""
        pairs, self.pairs = self.pairs, []
        if not (pairs and generator_stepped):
            return None
        real, fake = ([torch.cat(level) for level in zip(*side)] for side in ([p[0] for p in pairs],
                                                                              [p[1] for p in pairs]))
        c = torch.cat([p[2] for p in pairs])
        d_loss = hinge_d_loss(self.heads(real, c), self.heads(fake, c))
        if self.skipper.step(d_loss, step, self.opt, self.heads, self.grad_clip) is None:
            return None
        return d_loss.detach()


def renoise_target(teacher: Callable[[Tensor, Tensor], Tensor], x0_hat: Tensor, sigma: Tensor, noise: Tensor
                   ) -> Tensor:
    """The teacher's estimate of the student's x0_hat re-noised to sigma (finite), with no gradient."""
    with torch.no_grad():
        return teacher(at_level(x0_hat.detach(), sigma, noise), sigma)


def check_add_teacher(network: nn.Module, name: str) -> None:
    """ADD's discriminator reads the teacher U-Net's encoder features: other families are refused."""
    if getattr(network, "encoder_features", None) is None:
        raise ValueError(f"{name} is a {type(network).__name__}: ADD's discriminator reads a U-Net teacher's encoder "
                         "features (UNet.encoder_features), which this network has not; use --method lcm")



def student_loss(student: Denoiser, teacher: Callable[[Tensor, Tensor], Tensor], disc: Discriminator, x0: Tensor,
                 x: Tensor, s: Tensor, gens: list[torch.Generator], cond: Cond, grid: Tensor, *, adv_weight: float,
                 distill_weight: float, weighting: str, disc_sigma_max: float | None = None) -> tuple[Tensor, dict]:
    """ADD's per-sample student loss adv_weight * L_adv + distill_weight * L_dist (module docstring) from x, the data
    x0 noised to the student's level s; each sample's draws from its own generator. ``teacher(x, sigma)`` is the
    teacher's CFG estimate, ``grid`` its ascending grid; the discriminator sees levels up to ``disc_sigma_max``
    (None: every finite one). Returns the losses and their terms' means (for the log)."""
    device, top = x0.device, len(grid) - int(bool(torch.isinf(grid[-1])))  # finite levels: grid[:top]
    top_d = top if disc_sigma_max is None else max(1, int((grid[:top] <= disc_sigma_max).sum()))
    n = per_sample(gens, lambda g: torch.randint(1, top, (1,), generator=g))  # above the boundary
    n_d = per_sample(gens, lambda g: torch.randint(0, top_d, (1,), generator=g))
    eps_t, eps_d = (per_sample(gens, lambda g: torch.randn(1, *x0.shape[1:], generator=g)).to(device)
                    for _ in range(2))
    t, sigma_d = grid[n].to(device), grid[n_d].to(device)
    x0_hat = student(x, s, cond)  # (B, C, h, w)
    dist = distillation_loss(x0_hat, renoise_target(teacher, x0_hat, t, eps_t), t, weighting)
    adv = disc.generator_loss(x0_hat, x0, sigma_d, eps_d, cond)
    return adv_weight * adv + distill_weight * dist, {"distill": dist.mean().detach(), "adv": adv.mean().detach()}

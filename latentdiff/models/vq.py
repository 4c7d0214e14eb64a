"""VQ-regularized autoencoder (VQGAN / LDM's VQ-f* models): a codebook between encoder and decoder.

van den Oord et al. 2017 (VQ-VAE), Esser et al. 2021 (VQGAN), Rombach et al. 2022 (LDM, VQ-reg.).
The layout follows diffusers' ``VQModel``: ``encoder`` (one output per latent channel, no log-variance),
``quant_conv``, ``quantize.embedding``, ``post_quant_conv``, ``decoder``.

As in LDM and diffusers, the diffusion model works on the continuous pre-quantization latents ``h``:
``encode`` returns normalized ``h`` and ``decode`` quantizes before decoding. The codebook is learned
either by gradient (codebook loss ||sg(h) - e||^2) or, with ``codebook_ema``, as an exponential moving
average of the encoder outputs assigned to each code (van den Oord et al. 2017, appendix A.1), which needs
no codebook loss. Both use the commitment loss beta ||h - sg(e)||^2 and a straight-through gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoencoder import AutoencoderConfig, AutoencoderKL, Part, reconstruction_loss


@dataclass
class QuantizerOutput:
    """What the quantizer reports during training."""

    quantized: Tensor  # (B, C, h, w) codebook vectors, with straight-through gradients to h
    loss: Tensor  # commitment (+ codebook, unless EMA) loss, a scalar
    indices: Tensor  # (B, h, w) code indices
    perplexity: Tensor  # exp(entropy of the code frequencies in this batch): 1 .. codebook_size
    usage: Tensor  # fraction of the codebook used in this batch


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with commitment loss; codebook learned by gradient or EMA."""

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, ema: bool = True, decay: float = 0.99,
                 eps: float = 1e-5):
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {codebook_size}")
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))  # codes set from data yet?
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size", torch.ones(codebook_size))  # EMA of assignments per code
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())  # EMA of their sum

    def lookup(self, h: Tensor) -> Tensor:
        """Nearest code index for every latent vector: (B, C, h, w) -> (B, h, w)."""
        flat = h.permute(0, 2, 3, 1).reshape(-1, self.dim)  # (N, C)
        codes = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]  # (N, K)
        return dist.argmin(1).view(h.shape[0], *h.shape[2:])

    def embed(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> codebook vectors (B, C, h, w)."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def forward(self, h: Tensor) -> QuantizerOutput:
        h = h.float()
        if self.training and not self.initialized:
            self._init_from_data(h)
        indices = self.lookup(h)
        onehot = F.one_hot(indices.flatten(), self.codebook_size).to(h.dtype)  # (N, K)
        if self.training and self.ema:
            self._ema_update(h, onehot)
        quantized = self.embed(indices)
        commitment = F.mse_loss(h, quantized.detach())
        loss = self.beta * commitment
        if not self.ema:
            loss = loss + F.mse_loss(quantized, h.detach())  # moves the codes towards the encoder outputs
        quantized = h + (quantized - h).detach()  # straight-through estimator
        probs = onehot.mean(0)
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return QuantizerOutput(quantized, loss, indices, perplexity.detach(), (probs > 0).float().mean())

    def _random_vectors(self, h: Tensor, n: int) -> Tensor:
        """``n`` encoder outputs drawn from the batch (with replacement), as codebook rows (n, C)."""
        flat = h.detach().permute(0, 2, 3, 1).reshape(-1, self.dim)
        return flat[torch.randint(len(flat), (n,), device=h.device)]

    @torch.no_grad()
    def _init_from_data(self, h: Tensor) -> None:
        """Start every code at an encoder output of the first training batch, so all codes are in use."""
        self.embedding.weight.copy_(self._random_vectors(h, self.codebook_size))
        if self.ema:
            self.embed_sum.copy_(self.embedding.weight)
            self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, h: Tensor, onehot: Tensor) -> None:
        """Codebook as an EMA of assigned encoder outputs, with Laplace smoothing of the counts; codes whose
        count has decayed below 1 (unused for a long while) restart at a random encoder output."""
        flat = h.permute(0, 2, 3, 1).reshape(-1, self.dim)
        self.cluster_size.lerp_(onehot.sum(0), 1 - self.decay)
        self.embed_sum.lerp_(onehot.t() @ flat, 1 - self.decay)
        dead = self.cluster_size < 1.0
        if dead.any():
            fresh = self._random_vectors(h, int(dead.sum()))
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embedding.weight.copy_(self.embed_sum / smoothed[:, None])


class DeterministicLatent:
    """The posterior interface (mean, logvar, sample, mode, kl) for an encoder without noise: a point mass."""

    def __init__(self, h: Tensor):
        self.mean = h
        self.logvar = torch.full_like(h, -30.0)  # the floor DiagonalGaussian clamps to: std ~ 3e-7
        self.std = torch.zeros_like(h)
        self.var = self.std

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self.mean

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        return self.mean.new_zeros(self.mean.shape[0])


class AutoencoderVQ(AutoencoderKL):
    """VQ-regularized autoencoder with the same encode/decode interface as ``AutoencoderKL``."""

    def __init__(self, config: AutoencoderConfig):
        if config.regularizer != "vq":
            raise ValueError(f"AutoencoderVQ needs regularizer='vq', got {config.regularizer!r}")
        super().__init__(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(c, c, 1) if config.use_quant_conv else None
        self.quantize = VectorQuantizer(config.codebook_size, c, config.commitment_weight, config.codebook_ema,
                                        config.codebook_decay)

    def _pre_quant(self, images: Tensor, down: Part | None = None) -> Tensor:
        self._check_images(images)
        h = self.encoder(images, down)  # (B, C, h, w)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def encode_posterior(self, images: Tensor, down: Part | None = None) -> DeterministicLatent:
        """Images -> the continuous pre-quantization latents (a point mass); ``down``: see ``AutoencoderKL``."""
        return DeterministicLatent(self._pre_quant(images, down))

    def decode_raw(self, z: Tensor, up: Part | None = None) -> Tensor:
        """Pre-quantization latents -> nearest codes -> images; ``up``: see ``AutoencoderKL.decode_raw``."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"expected latents of shape (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}"
            )
        return self._decode_quantized(self.quantize.embed(self.quantize.lookup(z.float())), up)

    def _decode_quantized(self, quantized: Tensor, up: Part | None = None) -> Tensor:
        if self.post_quant_conv is not None:
            quantized = self.post_quant_conv(quantized)
        return self.decoder(quantized, up)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, QuantizerOutput]:
        """Training pass: images -> (reconstruction through the codebook, quantizer report)."""
        out = self.quantize(self._pre_quant(images))
        return self._decode_quantized(out.quantized), out


def build_autoencoder(config: AutoencoderConfig) -> AutoencoderKL:
    """The autoencoder class the config's regularizer asks for: ``AutoencoderKL`` or ``AutoencoderVQ``."""
    return AutoencoderVQ(config) if config.regularizer == "vq" else AutoencoderKL(config)


def vq_loss(reconstruction: Tensor, images: Tensor, quantizer: QuantizerOutput,
            recon: str = "l1") -> tuple[Tensor, dict[str, Tensor]]:
    """Reconstruction + the quantizer's commitment (and codebook) loss; reports perplexity and usage."""
    rec = reconstruction_loss(reconstruction, images, recon)
    loss = rec + quantizer.loss
    return loss, {"loss": loss.detach(), "recon": rec.detach(), "vq": quantizer.loss.detach(),
                  "perplexity": quantizer.perplexity, "usage": quantizer.usage}

"""Fixtures shared by the data tests."""

from __future__ import annotations

import pytest
import torch

from latentdiff.components import save_autoencoder
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL


def _tiny_autoencoder(folder, seed: int = 0) -> AutoencoderKL:
    """A factor-2 autoencoder with random weights, saved as a component folder."""
    torch.manual_seed(seed)
    ae = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                                         norm_groups=4, mid_attention=False, scale_factor=0.5))
    save_autoencoder(folder, ae)
    return ae.eval()


@pytest.fixture(scope="session")
def tiny_autoencoder():
    """``tiny_autoencoder(folder)`` writes a tiny random autoencoder component there and returns it."""
    return _tiny_autoencoder

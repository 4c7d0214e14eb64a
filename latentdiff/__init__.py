"""latentdiff: a PyTorch toolkit for latent diffusion."""

from latentdiff.types import Cond

__version__ = "0.1.0"
__all__ = ["Cond", "__version__"]

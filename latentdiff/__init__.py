"""latentdiff: a PyTorch toolkit for latent diffusion."""

from latentdiff.types import Cond

__version__ = "0.1.0"
__all__ = ["Cond", "Pipeline", "__version__", "load"]


def __getattr__(name: str):
    # The pipeline pulls in every model family; import it only when it is asked for.
    if name in ("load", "Pipeline"):
        from latentdiff import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")

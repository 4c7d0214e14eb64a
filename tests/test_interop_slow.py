"""At real size (slow, outside CI): an SD-1.5-shaped model with random weights, saved as a diffusers folder
and as one original-layout file, loads through both routes into identical parameters."""

from __future__ import annotations

import pytest
import torch

from latentdiff.interop import open_model
from latentdiff.interop.single_file import to_original_state
from latentdiff.io import write_safetensors

pytest.importorskip("diffusers", reason="diffusers builds the reference pipeline")


@pytest.mark.slow
def test_sd15_shaped_checkpoint_loads_identically_through_both_routes(tmp_path):
    from interop_tiny import sd15_pipeline

    folder = sd15_pipeline(tmp_path / "sd15")  # fp16 storage keeps it at 2 GB
    a = open_model(folder)  # fp32, the default
    single = tmp_path / "sd15.safetensors"
    write_safetensors(single, to_original_state(a))
    assert sum(v.numel() for v in a.denoiser.network.parameters()) > 850e6  # really SD-1.5-sized
    b = open_model(single, tokenizer=folder)  # no overrides: heads, groups, widths from the family and shapes
    assert b.family == "sd1" and b.spec.unet == a.spec.unet
    for get in (lambda m: m.denoiser.network.state_dict(), lambda m: m.autoencoder.state_dict(),
                lambda m: m.text_encoder.canonical_state_dict()):
        sa, sb = get(a), get(b)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

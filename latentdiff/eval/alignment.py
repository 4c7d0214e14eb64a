"""Text alignment: CLIP score with a local CLIP folder (Hessel et al. 2021), and the shapes judge.

CLIP score = 100 * max(cos(image embedding, text embedding), 0), per image, averaged; the same
definition and scaling as torchmetrics' ``CLIPScore``. The folder is a transformers CLIP model saved
with its processor (``CLIPModel`` + ``CLIPProcessor`` ``save_pretrained``), e.g. openai/clip-vit-base-patch16.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from latentdiff.images import to_uint8


def _embedding(out) -> Tensor:
    """transformers returns a tensor or, in newer versions, an output object with the pooled embedding."""
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipScorer:
    """CLIP score of images against prompts, with a local CLIP model and processor."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu"):
        folder = Path(folder)
        processor_files = ("preprocessor_config.json", "processor_config.json")
        if not (folder / "config.json").is_file() or not any((folder / f).is_file() for f in processor_files):
            raise FileNotFoundError(f"no CLIP model and processor at {folder} (need config.json, weights, "
                                    "a processor config and tokenizer files); save both with "
                                    "CLIPModel/CLIPProcessor.save_pretrained and pass the folder (--clip DIR)")
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> np.ndarray:
        """Per-image scores for (B, 3, H, W) images in [-1, 1] and B prompts."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        pixels = self.processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]
        text = self.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
        img = _embedding(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        txt = _embedding(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                      attention_mask=text["attention_mask"].to(self.device)))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (100 * (img * txt).sum(-1)).clamp(min=0).double().cpu().numpy()


def judge_accuracy(images: list, scenes: list) -> dict:
    """Per-attribute accuracy of the shapes judge (``latentdiff.data.judge.score``), floats rounded to 4."""
    from latentdiff.data.judge import score

    out = score([np.asarray(im) for im in images], scenes)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}

"""CLIP score against torchmetrics with a tiny random CLIP saved in the test; the judge report."""

import json

import numpy as np
import pytest
import torch

from latentdiff.eval.alignment import ClipScorer, judge_accuracy


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    processor = transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,  # noqa: C408
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,  # noqa: C408
                           image_size=30, patch_size=6),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "model", model, processor


def test_clip_score_matches_clip_forward(clip_folder):
    # Reference: CLIPModel.forward's own normalized embeddings; torchmetrics' CLIPScore uses the same definition
    # (100 * cosine) but 1.9 cannot read transformers 5's output objects, so it is not called here.
    folder, model, processor = clip_folder
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["a red circle", "a blue square on the left", "green", "a small yellow triangle at the top"]
    ours = ClipScorer(folder)(images, prompts)
    uint8 = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    inputs = processor(text=prompts, images=list(uint8), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cosine = (out.image_embeds * out.text_embeds).sum(-1).double().numpy()
    assert ours.shape == (4,)
    assert np.allclose(ours, 100 * np.maximum(cosine, 0), atol=1e-3)
    assert not np.allclose(ours, ours[0])  # the prompts and images matter


def test_clip_errors(clip_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no CLIP model and processor"):
        ClipScorer(tmp_path)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        ClipScorer(clip_folder[0])(torch.zeros(2, 3, 32, 32), ["a"])


def test_judge_accuracy_on_rendered_truth():
    from latentdiff.data.shapes import heldout_prompts, render

    prompts = heldout_prompts(6, seed=0)
    images = [render(scene, 64, seed=i) for i, (_, scene) in enumerate(prompts)]
    out = judge_accuracy(images, [s for _, s in prompts])
    assert out["n"] == 6 and out["all_correct"] == 1.0
    wrong = judge_accuracy(images[::-1], [s for _, s in prompts])
    assert wrong["all_correct"] < 1.0

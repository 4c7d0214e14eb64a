"""Memorization and duplicates with planted copies."""

import numpy as np
import pytest
import torch

from latentdiff.data.shapes import ShapesDataset
from latentdiff.eval.memorization import find_duplicates, memorization, nearest_training, pixels


def test_nearest_training_matches_brute_force():
    rng = np.random.default_rng(0)
    train, queries = rng.normal(size=(200, 6)), rng.normal(size=(30, 6))
    dist, idx = nearest_training(queries, train, k=3, chunk=7)
    full = np.linalg.norm(queries[:, None] - train[None], axis=-1)
    assert np.array_equal(idx, np.argsort(full, 1)[:, :3])
    assert np.allclose(dist, np.sort(full, 1)[:, :3])
    with pytest.raises(ValueError, match="use one feature space"):
        nearest_training(queries, train[:, :4])


@pytest.fixture(scope="module")
def shapes_sets():
    train = torch.stack([ShapesDataset(300, size=32, seed=0)[i]["image"] for i in range(300)])
    fresh = torch.stack([ShapesDataset(200, size=32, seed=1)[i]["image"] for i in range(200)])
    return train, fresh


def test_planted_copies_are_flagged_and_fresh_samples_mostly_not(shapes_sets):
    train, fresh = shapes_sets
    generated = torch.stack([ShapesDataset(100, size=32, seed=2)[i]["image"] for i in range(100)])
    planted = [3, 17, 42, 77, 90]
    sources = [5, 11, 200, 250, 299]
    for p, s in zip(planted, sources):  # exact copies, and one copy with faint noise
        generated[p] = train[s]
    generated[90] = (train[299] + 0.01 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    out = memorization(pixels(generated), pixels(train), pixels(fresh), quantile=0.01, space="pixels")
    assert set(planted) <= set(out["near_copies"])
    assert [out["nearest_index"][p] for p in planted] == sources
    assert out["nearest_distance"][3] < 1e-5  # an exact copy (rounding of the expanded distance)
    assert len(out["near_copies"]) <= len(planted) + 5  # fresh samples: about 1% expected
    with pytest.raises(ValueError, match="needs at least 100 fresh real samples"):
        memorization(pixels(generated), pixels(train), pixels(fresh[:50]))
    with pytest.raises(ValueError, match="fresh_real"):
        memorization(pixels(generated), pixels(train))


def test_find_duplicates_finds_planted_groups(shapes_sets):
    train, _ = shapes_sets
    data = train[:120].clone()
    data[50] = data[10]  # an exact duplicate
    data[60] = (data[10] + 2 / 255).clamp(-1, 1)  # a near-duplicate of the same image (RMSE ~ 1/255)
    data[70] = data[20]
    out = find_duplicates(pixels(data))
    groups = [g for g in out["groups"] if {10, 20} & set(g)]
    assert [10, 50, 60] in groups and [20, 70] in groups
    assert out["threshold"] == 0.02 and out["duplicate_images"] >= 3
    assert all(d <= 0.02 for _, _, d in out["pairs"])
    # The same set without the plants has no pair closer than 0.1 of what we planted.
    # Without the plants, the only pairs are true repeats of the data: the same scene drawn twice (a layout whose
    # jittered positions collide falls back to the anchors, so two such draws of one scene are the same image).
    clean = find_duplicates(pixels(train[:120]), threshold=0.002)
    scenes = [ShapesDataset(300, size=32, seed=0)[i]["scene"] for i in range(120)]
    assert all(scenes[i] == scenes[j] for i, j, _ in clean["pairs"])
    with pytest.raises(ValueError, match="explicit threshold"):
        find_duplicates(np.zeros((4, 3)), rmse=False)

"""Data sets: the built-in procedural ``shapes`` set, image folders, and the latent cache."""

from __future__ import annotations


def make_image_dataset(data: str, num_images: int, image_size: int, seed: int, split: str = "train"):
    """``"shapes"`` -> the built-in set (``num_images`` items); ``"skimage"`` -> ``num_images`` random crops of
    scikit-image's sample photographs; ``"tones"`` -> ``num_images`` tone clips as 1-channel mel spectrograms of
    ``image_size`` mel bands by ``image_size`` frames (``data/tones.py``); anything else -> an image folder."""
    if data == "tones":
        from latentdiff.audio import MelSpec
        from latentdiff.data.tones import ToneSet

        return ToneSet(num_images, MelSpec(n_mels=image_size), frames=image_size, seed=seed, split=split)
    if data == "shapes":
        from latentdiff.data.shapes import ShapesDataset

        return ShapesDataset(num_images, size=image_size, seed=seed, split=split)
    if data == "skimage":  # random crops of scikit-image's bundled photographs (held-out ones excluded)
        from latentdiff.data.natural import skimage_crops

        return skimage_crops(image_size, num_images, seed)
    from latentdiff.data.folder import ImageFolder

    return ImageFolder(data, image_size)

"""The latent cache: a data set encoded once into shards of posterior mean and log-variance, per bucket.

Layout of a cache folder::

    cache.json                 what was encoded, by which autoencoder; buckets with their shapes and shards
    shard_00000.safetensors    mean, logvar: (N, C, h, w) float32, raw (un-normalized) latent space;
                               label (N,) int64 with class folders; context (N, L, D), context_mask (N, L)
                               and vector (N, D) when a frozen text encoder's embeddings are cached;
                               size_ids (N, 6) int64 for folders / tar shards: original (h, w), crop
                               (top, left), target (h, w), SDXL's size conditioning
                               control (N, 3, H, W) uint8 with ``control`` set: each image's condition map
                               (``data/control_maps.py``: edges, layout, depth), for ControlNet training
    shard_00000.json           captions, attributes (scenes), source keys of the same N items
    text_empty.safetensors     the empty prompt's embedding (caption dropout), when text is cached

Every shard holds one bucket (one latent shape); a data set at one square size is a single bucket.
Training draws a fresh sample ``mean + exp(logvar / 2) * eps`` from the posterior every step and
normalizes it with the autoencoder's own scale and shift, so the cache stays valid if those change.

Sources are streamed: items are read once, in order, and each bucket's pending images are encoded
a batch at a time, so memory holds at most a batch of images and a shard of latents per bucket.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor

from latentdiff.conditioning.text import TextEncoderConfig
from latentdiff.config import COUNT, FRACTION, IMAGE_SIDE, at_least, bounds, one_of
from latentdiff.data.buckets import BucketBatches, batch_indices, make_buckets, most_square, nearest_bucket
from latentdiff.data.control_maps import CONTROL_KINDS, control_map
from latentdiff.data.folder import (
    MISSING_CAPTION_CHOICES,
    cover_and_crop,
    image_to_tensor,
    resize_center_crop,
)
from latentdiff.io import atomic_folder, read_json, reading, write_json, write_safetensors
from latentdiff.types import Cond

TEXT_EMPTY_NAME = "text_empty.safetensors"
TEXT_KEYS = ("kind", "path", "max_length", "layer")  # the encoder settings cached embeddings depend on


@dataclass
class CacheConfig:
    """What ``latentdiff cache`` encodes, and where it writes."""

    autoencoder: str = "runs/vae/autoencoder"  # autoencoder component folder (from train-vae)
    out: str = "runs/cache"  # cache folder to write
    data: str = "shapes"  # "shapes" (built in), a folder of images, or tar shards ("dir/shard-{000..009}.tar")
    num_images: int = 10000  # shapes: number of images to encode
    image_size: int = 64  # pixels; must be divisible by the autoencoder's factor
    split: str = "train"  # shapes: "train" or "heldout"
    seed: int = 0  # shapes: data set seed
    attribute_dropout: float = 0.0  # shapes: chance a caption's object leaves out its size, colour or shape word
    extra_colors: tuple[str, ...] = ()  # shapes: colours beyond the default vocabulary (data.shapes.EXTRA_COLORS)
    extra_share: float = 0.0  # shapes: chance an object takes an extra colour (0: as often as any other pair)
    batch_size: int = 64  # images encoded per batch
    shard_size: int = 8192  # items per shard file
    class_folders: bool = False  # folder: each subfolder is a class (integer labels + class names are cached)
    missing_caption: str = "empty"  # an image without a caption gets "empty" (""), "filename" or "class" (its name)
    min_size: int = 8  # pixels: images with a shorter side are skipped (and named)
    buckets: bool = False  # aspect-ratio buckets (folders, tar shards): each image at its nearest aspect ratio
    bucket_area: int = 0  # pixels per bucket (H * W); 0 = image_size ** 2
    bucket_step: int = 0  # bucket sides are multiples of this; 0 = autoencoder factor x 8 (fits 4-level U-Nets)
    bucket_max_aspect: float = 4.0  # the widest (and tallest) bucket's aspect ratio
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # "pretrained": cache its embeddings
    control: str = ""  # also store each image's condition map for train-controlnet: "edges", "layout", "depth"

    BOUNDS = bounds({"num_images": COUNT, "image_size": IMAGE_SIDE, "split": one_of("train", "heldout"),
                     "attribute_dropout": FRACTION, "extra_share": FRACTION, "batch_size": COUNT,
                     "shard_size": COUNT, "missing_caption": one_of(*MISSING_CAPTION_CHOICES), "min_size": COUNT,
                     "bucket_area": at_least(0), "bucket_step": at_least(0), "bucket_max_aspect": at_least(1),
                     "control": one_of("", *CONTROL_KINDS)})


CACHE_PRESETS: dict[str, dict] = {
    "shapes": {},
    "shapes-demo": {"image_size": 32, "num_images": 10000},
    "shapes-default": {"image_size": 32, "num_images": 40000},  # the bundled model's: more scenes for a long run
    "shapes-demo-minilm": {"image_size": 32, "num_images": 10000,
                           "text_encoder": {"kind": "pretrained", "path": "minilm", "max_length": 32}},
    "shapes-test": {"num_images": 64, "shard_size": 40},
    # The bundled model's data plus a colour it never saw (orange), for `train-lora --preset shapes-orange`.
    "shapes-orange": {"image_size": 32, "num_images": 8000, "seed": 1, "extra_colors": ("orange",), "extra_share": 0.4},
}


def _scene_to_json(scene) -> dict | None:
    return dataclasses.asdict(scene) if scene is not None else None


class _BucketWriter:
    """Collects one bucket's images, encodes them a batch at a time, and writes full shards."""

    def __init__(self, size: tuple[int, int]):
        self.size = size
        self.pending: list[tuple[Tensor, dict, int | None, Tensor | None]] = []  # (image, meta, label, control map)
        self.encoded: list[dict[str, Tensor]] = []  # per item: mean, logvar (+ label, context, vector)
        self.meta: list[dict] = []
        self.shards: list[str] = []
        self.count = 0
        self.latent_shape: list[int] | None = None


class _CacheBuilder:
    """Streams items into per-bucket shards (see :func:`build_cache`)."""

    def __init__(self, autoencoder, tmp: Path, batch_size: int, shard_size: int, text_encoder):
        self.autoencoder, self.tmp, self.text_encoder = autoencoder, tmp, text_encoder
        self.batch_size, self.shard_size = batch_size, shard_size
        self.writers: dict[tuple[int, int], _BucketWriter] = {}
        self.num_shards = 0

    def add(self, size: tuple[int, int], image: Tensor, meta: dict, label: int | None,
            control: Tensor | None = None) -> None:
        writer = self.writers.setdefault(size, _BucketWriter(size))
        writer.pending.append((image, meta, label, control))
        writer.count += 1
        if len(writer.pending) == self.batch_size:
            self._encode(writer)

    @torch.no_grad()
    def _encode(self, writer: _BucketWriter) -> None:
        images, metas, labels, controls = zip(*writer.pending)
        writer.pending = []
        posterior = self.autoencoder.encode_posterior(torch.stack(images))
        mean, logvar = posterior.mean.float().cpu(), posterior.logvar.float().cpu()
        writer.latent_shape = list(mean.shape[1:])
        rows = [{"mean": mean[i], "logvar": logvar[i]} for i in range(len(images))]
        if labels[0] is not None:
            for row, label in zip(rows, labels):
                row["label"] = torch.tensor(label, dtype=torch.long)
        if controls[0] is not None:
            for row, control in zip(rows, controls):
                row["control"] = control
        if "crop_top_left" in metas[0]:  # SDXL's size ids: original (h, w), crop (top, left), target (h, w)
            for row, meta in zip(rows, metas):
                row["size_ids"] = torch.tensor([*meta["original_size"], *meta["crop_top_left"], *writer.size])
        if self.text_encoder is not None:
            for row, text in zip(rows, text_rows(self.text_encoder, [m["caption"] for m in metas])):
                row.update(text)
            if hasattr(self.text_encoder, "_cache"):  # its per-prompt memo would grow with the whole data set
                self.text_encoder._cache.clear()
        writer.encoded.extend(rows)
        writer.meta.extend(metas)
        while len(writer.encoded) >= self.shard_size:
            self._write_shard(writer, self.shard_size)

    def _write_shard(self, writer: _BucketWriter, n: int) -> None:
        rows, writer.encoded = writer.encoded[:n], writer.encoded[n:]
        meta, writer.meta = writer.meta[:n], writer.meta[n:]
        name = f"shard_{self.num_shards:05d}"
        self.num_shards += 1
        write_safetensors(self.tmp / f"{name}.safetensors", stack_rows(rows))
        write_json(self.tmp / f"{name}.json", meta)
        writer.shards.append(name)

    def finish(self) -> list[_BucketWriter]:
        for writer in self.writers.values():
            if writer.pending:
                self._encode(writer)
            if writer.encoded:
                self._write_shard(writer, len(writer.encoded))
        return list(self.writers.values())


def text_rows(text_encoder, captions: list[str]) -> list[dict[str, Tensor]]:
    """Per caption: its real tokens' features ``context`` (l, D), and ``vector`` (D,) when the encoder pools."""
    cond = text_encoder(captions)
    rows = []
    for i in range(len(captions)):
        ctx = cond.context[i] if cond.context_mask is None else cond.context[i][cond.context_mask[i]]
        row = {"context": ctx.float().cpu()}
        if cond.vector is not None:
            row["vector"] = cond.vector[i].float().cpu()
        rows.append(row)
    return rows


def stack_rows(rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-item tensors -> batched shard tensors; token features are zero-padded with a mask."""
    out = {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "context"}
    if "context" in rows[0]:
        lengths = [r["context"].shape[0] for r in rows]
        context = torch.zeros(len(rows), max(lengths), rows[0]["context"].shape[1])
        mask = torch.zeros(len(rows), max(lengths), dtype=torch.bool)
        for i, r in enumerate(rows):
            context[i, : lengths[i]] = r["context"]
            mask[i, : lengths[i]] = True
        out["context"], out["context_mask"] = context, mask
    return out


def _prepared(item: dict, buckets: list[tuple[int, int]] | None, image_size: int | None) -> tuple[tuple, Tensor, dict]:
    """An item's bucket size, image tensor (resize-cropped to it) and the metadata the shard keeps."""
    image = item["image"]
    meta = {"caption": item["caption"], "scene": _scene_to_json(item.get("scene"))}
    if isinstance(image, Tensor):  # already at its final size (the built-in shapes set)
        if buckets is not None:
            raise ValueError("aspect-ratio buckets need images of their own size (an image folder or tar shards), "
                             "not the built-in shapes set: set buckets = false")
        return tuple(image.shape[-2:]), image, meta
    if not isinstance(image, Image.Image):
        raise TypeError(f"an item's image must be a tensor or a PIL image, got {type(image).__name__}")
    w, h = image.size
    size = buckets[nearest_bucket(w, h, buckets)] if buckets is not None else (image_size, image_size)
    top_left = list(cover_and_crop(w, h, size)[1])  # where the centre crop of the resized image began
    meta.update(key=item.get("key"), original_size=[h, w], crop_top_left=top_left)
    return size, image_to_tensor(resize_center_crop(image, size)), meta


def _items(dataset) -> tuple[Iterator[dict], int | None]:
    """A map-style data set (len + getitem) or an iterable of items -> (iterator, count if known)."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        getter = getattr(dataset, "record", dataset.__getitem__)  # an ImageFolder gives PIL images unresized
        return (getter(i) for i in range(len(dataset))), len(dataset)
    return iter(dataset), None


def build_cache(autoencoder, dataset: Iterable[dict], out: str | Path, batch_size: int = 64, shard_size: int = 8192,
                source: dict | None = None, quiet: bool = False, *, image_size: int | None = None,
                buckets: list[tuple[int, int]] | None = None, text_encoder=None,
                class_names: list[str] | None = None, control: str = "") -> Path:
    """Encode ``dataset`` into a cache folder, atomically.

    Items are dicts with ``image`` (a tensor at its final size, or a PIL image to resize-crop to
    ``image_size`` or to its nearest bucket), ``caption``, and optionally ``scene``, ``label``, ``key``.
    With ``text_encoder`` (a frozen one), each caption's token embeddings are cached too; with ``control`` (a kind of
    ``data/control_maps.py``), each image's condition map (layout and depth need items with ``scene`` and
    ``render_seed``, as the shapes set gives).
    """
    from tqdm import tqdm

    out = Path(out)
    autoencoder.eval()
    items, total = _items(dataset)
    if total == 0:
        raise ValueError("the data set to cache is empty")
    progress = tqdm(total=total, desc="caching", disable=quiet or not sys.stderr.isatty(),
                    file=sys.stderr)  # a bar on a terminal; nothing in a log file
    with atomic_folder(out) as tmp:
        builder = _CacheBuilder(autoencoder, tmp, batch_size, shard_size, text_encoder)
        has_labels = None
        for item in items:
            label = item.get("label")
            if has_labels is None:
                has_labels = label is not None
            elif has_labels != (label is not None):
                raise ValueError(f"item {item.get('key')!r}: either every item has a label or none does")
            size, image, meta = _prepared(item, buckets, image_size)
            cmap = control_map(control, image, item.get("scene"), item.get("render_seed")) if control else None
            builder.add(size, image, meta, label, cmap)
            progress.update(1)
        progress.close()
        writers = builder.finish()
        if not writers:
            raise ValueError("the data set to cache is empty (no readable item)")
        order = {size: i for i, size in enumerate(buckets or [])}
        writers.sort(key=lambda w: order.get(w.size, 0))
        info_buckets = [{"size": list(w.size), "latent_shape": w.latent_shape, "num_items": w.count,
                         "shards": w.shards} for w in writers]
        square = most_square([w.size for w in writers])
        info = {
            "format": "latentdiff-latent-cache", "version": 2, "num_items": sum(w.count for w in writers),
            "shards": [s for w in writers for s in w.shards], "latent_shape": writers[square].latent_shape,
            "bucketed": buckets is not None, "buckets": info_buckets, "class_names": class_names,
            "labels": bool(has_labels), "source": source or {}, "text": None, "control": control or None,
        }
        if text_encoder is not None:
            (empty,) = text_rows(text_encoder, [""])
            write_safetensors(tmp / TEXT_EMPTY_NAME, empty)
            info["text"] = {"encoder": {k: getattr(text_encoder.config, k) for k in TEXT_KEYS},
                            "dim": int(empty["context"].shape[-1]), "vector": "vector" in empty}
        write_json(tmp / "cache.json", info)
    return out


def open_source(cfg: CacheConfig) -> tuple[object, list[str] | None]:
    """The data set a cache config names, and its class names (None without class folders)."""
    from latentdiff.data.folder import ImageFolder
    from latentdiff.data.shapes import ShapesDataset
    from latentdiff.data.tars import TarShards, is_tar_source

    if cfg.data == "shapes":
        return ShapesDataset(cfg.num_images, size=cfg.image_size, seed=cfg.seed, split=cfg.split,
                             attribute_dropout=cfg.attribute_dropout, extra_colors=cfg.extra_colors,
                             extra_share=cfg.extra_share), None
    if is_tar_source(cfg.data):
        if cfg.class_folders:
            raise ValueError("class_folders is for image folders; tar shards carry labels in .cls members")
        return TarShards(cfg.data, min_size=cfg.min_size, missing_caption=cfg.missing_caption), None
    folder = ImageFolder(cfg.data, cfg.image_size, min_size=cfg.min_size, class_folders=cfg.class_folders,
                         missing_caption=cfg.missing_caption)
    return folder, folder.class_names


def cache_dataset(cfg: CacheConfig, quiet: bool = False) -> Path:
    """``latentdiff cache``: load the autoencoder, open the data, encode it (and its captions) into ``cfg.out``."""
    from latentdiff.components import load_autoencoder
    from latentdiff.conditioning.text import build_text_encoder

    if cfg.control in ("layout", "depth") and cfg.data != "shapes":
        raise ValueError(f"control = {cfg.control!r} is drawn from shapes scenes: use data = \"shapes\", or control = "
                         "\"edges\", which any image gives")
    if cfg.control and cfg.buckets:
        raise ValueError("control maps are stored at one square image size: set buckets = false")
    autoencoder = load_autoencoder(cfg.autoencoder)
    f = autoencoder.factor
    if cfg.image_size % f:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the autoencoder's factor {f}")
    buckets = None
    if cfg.buckets:
        step = cfg.bucket_step or 8 * f
        if step % f:
            raise ValueError(f"bucket_step {step} must be a multiple of the autoencoder's factor {f} "
                             f"(times the U-Net's 2 ** (levels - 1), e.g. {8 * f})")
        buckets = make_buckets(cfg.bucket_area or cfg.image_size ** 2, step, cfg.bucket_max_aspect)
    text_encoder = None
    if cfg.text_encoder.kind == "pretrained":  # frozen: its embeddings can be cached (a hashed one is trained)
        text_encoder = build_text_encoder(cfg.text_encoder)
    dataset, class_names = open_source(cfg)
    source = {"autoencoder": str(Path(cfg.autoencoder).resolve()), "data": cfg.data, "split": cfg.split,
              "seed": cfg.seed, "image_size": cfg.image_size}
    return build_cache(autoencoder, dataset, cfg.out, cfg.batch_size, cfg.shard_size, source=source, quiet=quiet,
                       image_size=cfg.image_size, buckets=buckets, text_encoder=text_encoder,
                       class_names=class_names, control=cfg.control)


class LatentCache:
    """A cache folder loaded into memory: ``sample(indices, generator)`` gives raw latents and captions.

    Items are numbered bucket after bucket; one batch must come from one bucket (``batch_indices``).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        info_path = self.folder / "cache.json"
        self.info = read_json(info_path, "run `latentdiff cache` to build a latent cache first")
        with reading(info_path, "build the cache again with `latentdiff cache`"):
            buckets = self.info.get("buckets") or [  # a version-1 cache: one bucket
                {"size": None, "latent_shape": self.info["latent_shape"], "num_items": self.info["num_items"],
                 "shards": self.info["shards"]}]
            self.bucketed = bool(self.info.get("bucketed"))
            self.class_names = self.info.get("class_names")
            self.bucket_shapes = [tuple(int(n) for n in b["latent_shape"]) for b in buckets]
            shards = [list(map(str, b["shards"])) for b in buckets]
            num_items = int(self.info["num_items"])
        self.means, self.stds, self.meta = [], [], []
        extra: dict[str, list[Tensor]] = {}
        for names in shards:
            means, logvars = [], []
            for name in names:
                tensors = load_file(str(self.folder / f"{name}.safetensors"))
                means.append(tensors.pop("mean"))
                logvars.append(tensors.pop("logvar"))
                for k, v in tensors.items():
                    extra.setdefault(k, []).append(v)
                self.meta.extend(json.loads((self.folder / f"{name}.json").read_text()))
            self.means.append(torch.cat(means))  # (N_b, C, h_b, w_b)
            self.stds.append(torch.cat(logvars).mul(0.5).exp())
        self.sizes = [len(m) for m in self.means]
        self.offsets = torch.tensor([0] + self.sizes[:-1]).cumsum(0)
        if sum(self.sizes) != num_items or len(self.meta) != sum(self.sizes):
            raise ValueError(f"latent cache {self.folder} is incomplete: rebuild it with `latentdiff cache`")
        self.captions = [m["caption"] for m in self.meta]
        self.labels = torch.cat(extra["label"]) if "label" in extra else None  # (N,)
        self.size_ids = torch.cat(extra["size_ids"]) if "size_ids" in extra else None  # (N, 6), data.folder/tars
        self.control_kind = self.info.get("control")  # the condition maps' kind, when the cache stores them
        self.control = torch.cat(extra["control"]) if "control" in extra else None  # (N, 3, H, W) uint8
        self._load_text(extra)
        self._samplers: dict[tuple, BucketBatches] = {}

    def _load_text(self, extra: dict[str, list[Tensor]]) -> None:
        """Cached token embeddings, zero-padded to one length: context (N, L, D), context_mask (N, L), vector."""
        self.text = self.info.get("text")
        self.context = self.context_mask = self.vector = self.empty = None
        if self.text is None:
            return
        length = max(c.shape[1] for c in extra["context"])
        self.context = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, length - c.shape[1]))
                                  for c in extra["context"]])
        self.context_mask = torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[1]))
                                       for m in extra["context_mask"]])
        self.vector = torch.cat(extra["vector"]) if "vector" in extra else None
        self.empty = load_file(str(self.folder / TEXT_EMPTY_NAME))  # context (l, D), vector (D,)

    def __len__(self) -> int:
        return sum(self.sizes)

    @property
    def mean(self) -> Tensor:
        """All posterior means (N, C, h, w); only for a cache of one bucket."""
        if len(self.means) != 1:
            raise ValueError(f"this cache has {len(self.means)} buckets of different shapes: use .means[b]")
        return self.means[0]

    @property
    def std(self) -> Tensor:
        if len(self.stds) != 1:
            raise ValueError(f"this cache has {len(self.stds)} buckets of different shapes: use .stds[b]")
        return self.stds[0]

    @property
    def autoencoder_path(self) -> str | None:
        return self.info.get("source", {}).get("autoencoder")

    def bucket_of(self, indices: Tensor) -> int:
        """The one bucket all ``indices`` fall in (an error if they span several)."""
        buckets = torch.searchsorted(self.offsets, indices, right=True) - 1
        if len(buckets) == 0 or (buckets != buckets[0]).any():
            raise ValueError(f"a batch must come from one bucket; indices span buckets {buckets.unique().tolist()}")
        return int(buckets[0])

    def batch_indices(self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """The items rank ``rank`` trains on at ``step``: a pure function of (seed, step), one bucket per batch.

        One square bucket: ``buckets.batch_indices`` over the global batch, rank ``r`` taking
        its slice; bucketed: :class:`~latentdiff.data.buckets.BucketBatches`.
        """
        if not self.bucketed:
            glob = batch_indices(step, batch_size * world_size, len(self), seed)
            return glob[rank * batch_size: (rank + 1) * batch_size]
        key = (batch_size, seed, rank, world_size)
        if key not in self._samplers:
            self._samplers[key] = BucketBatches(self.sizes, batch_size, seed, world_size, rank)
        return self._samplers[key](step)

    def check_divisible(self, factor: int) -> None:
        """Refuse buckets whose latent height or width the network cannot halve ``log2(factor)`` times."""
        bad = [s for s in self.bucket_shapes if s[1] % factor or s[2] % factor]
        if bad:
            raise ValueError(f"latent sizes {[f'{s[1]}x{s[2]}' for s in bad]} are not divisible by the network's "
                             f"down factor {factor}: re-cache with bucket_step = autoencoder factor x {factor}")

    def sample(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """Draw one posterior sample for each index: (raw latents (B, C, h, w), captions)."""
        b = self.bucket_of(indices)
        local = indices - self.offsets[b]
        mean, std = self.means[b][local], self.stds[b][local]
        eps = torch.randn(mean.shape, generator=generator)
        return mean + std * eps, [self.captions[i] for i in indices.tolist()]

    def uses_text(self, config: TextEncoderConfig) -> bool:
        """Whether training with text encoder ``config`` can read this cache's embeddings instead of encoding.

        A hashed encoder is trained, so it never can; a pretrained one can if the cache was made with
        the same settings, and a different one is an error rather than a silent mismatch.
        """
        if config.kind != "pretrained" or self.text is None:
            return False
        want = {k: getattr(config, k) for k in TEXT_KEYS}
        if want != self.text["encoder"]:
            diff = {k: (self.text["encoder"].get(k), want[k]) for k in TEXT_KEYS if want[k] != self.text["encoder"].get(k)}
            raise ValueError(f"the cache holds text embeddings of another encoder (cached vs configured: {diff}): "
                             "re-cache with the same text_encoder settings, or set cached_text = false")
        return True

    def text_cond(self, indices: Tensor, drop: Tensor) -> Cond:
        """The cached text Cond of ``indices``, with the empty prompt where ``drop`` is True (caption dropout).

        Padded to the batch's longest prompt, as the encoder itself pads, so training on cached
        embeddings sees the same tensors as encoding the captions every step.
        """
        if self.context is None:
            raise ValueError(f"latent cache {self.folder} holds no text embeddings")
        mask = self.context_mask[indices]  # (B, L)
        empty_ctx = self.empty["context"]  # (l0, D)
        keep = mask[~drop]
        length = max(int(keep.sum(1).max()) if len(keep) else 0, empty_ctx.shape[0] if drop.any() else 0)
        context, mask = self.context[indices, :length].clone(), mask[:, :length].clone()  # (B, L', D)
        context[drop] = 0.0
        context[drop, : empty_ctx.shape[0]] = empty_ctx
        mask[drop] = False
        mask[drop, : empty_ctx.shape[0]] = True
        vector = None
        if self.vector is not None:
            vector = self.vector[indices].clone()  # (B, D)
            vector[drop] = self.empty["vector"]
        return Cond(context=context, context_mask=mask, vector=vector)

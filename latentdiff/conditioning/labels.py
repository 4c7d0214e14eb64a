"""Class labels as conditioning: names or indices -> integer labels in ``cond.vector``, and the null class.

A class-conditional network (``models.families.for_class_data``) reads integer labels ``(B,)`` from
``cond.vector``. With ``n`` classes, label ``n`` is the null class: training swaps a label for it with
probability ``label_dropout``, and classifier-free guidance uses it as the unconditional branch
(Ho & Salimans 2022; DiT's ``num_classes`` row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from latentdiff.types import Cond


def null_label(class_names: Sequence[str]) -> int:
    """The null ("no class") label: one past the last class."""
    return len(class_names)


def class_names_of(labels: Tensor, names: Sequence[str] | None) -> list[str]:
    """Class names for a data set's labels: the cached names (class folders), else "0", "1", ... (tar .cls)."""
    if names:
        return list(names)
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise ValueError("class labels must be non-negative integers")
    return [str(i) for i in range(int(labels.max()) + 1)]


def resolve_labels(label: int | str | Sequence[int | str], class_names: Sequence[str], n: int) -> Tensor:
    """One label or one per item (a class name, or an index) -> a long tensor of ``n`` labels.

    A name wins over an index when a class is named by digits; an unknown name or an index out of range is
    an error that lists the classes.
    """
    labels = [label] * n if isinstance(label, (int, str)) else list(label)
    if len(labels) == 1 and n > 1:
        labels = labels * n
    if len(labels) != n:
        raise ValueError(f"{len(labels)} class labels for {n} prompts: give one label, or one per prompt")
    index = {name: i for i, name in enumerate(class_names)}
    out = []
    for item in labels:
        if isinstance(item, str) and item in index:
            out.append(index[item])
            continue
        i = int(item) if isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit()) else None
        if i is None or not 0 <= i < len(class_names):
            shown = ", ".join(class_names[:20]) + (" ..." if len(class_names) > 20 else "")
            raise ValueError(f"unknown class label {item!r}: this model knows {len(class_names)} classes "
                             f"({shown}); pass a name or an index 0..{len(class_names) - 1}")
        out.append(i)
    return torch.tensor(out, dtype=torch.long)


def with_labels(cond: Cond, labels: Tensor) -> Cond:
    """``cond`` with its vector replaced by integer labels (B,) for a class-conditional network."""
    return replace(cond, vector=labels.to(torch.long))


def drop_labels(labels: Tensor, drop: Tensor, null: int) -> Tensor:
    """Labels with the null class where ``drop`` is True (label dropout, for classifier-free guidance)."""
    return torch.where(drop, torch.full_like(labels, null), labels)

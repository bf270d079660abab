"""Datasets for the reference models: scikit-learn's digits by default, any image folder otherwise.

``load_dataset("digits", image_size=16)`` needs no download: the 1,797 8 x 8 grayscale digits of
``sklearn.datasets.load_digits`` (10 classes) are upsampled bilinearly to ``image_size`` and cut
into a fixed, class-stratified train / validation / test split (70 / 15 / 15 %, seed 0).
``load_dataset("/path/to/folder", image_size=224)`` reads an ``ImageFolder`` tree (one folder per
class), either with ``train/`` and ``val/`` (and optionally ``test/``) subfolders or as a single
tree that is split like the digits.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["Splits", "labels_of", "load_dataset", "load_digit_pairs", "load_digits", "load_image_folder"]


@dataclasses.dataclass
class Splits:
    """Train / validation / test datasets of ``(image [C, I, I] float32, label int64)`` pairs."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    class_names: list[str]
    name: str


def _split_indices(labels: np.ndarray, val_frac: float, test_frac: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=test_frac, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=val_frac / (1 - test_frac), stratify=labels[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


def load_digits(image_size: int = 16, *, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0) -> Splits:
    """scikit-learn's 8 x 8 digits, upsampled to ``image_size`` and standardised with the
    training split's mean and standard deviation (one channel)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8] in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, va, te = _split_indices(d.target, val_frac, test_frac, seed)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return Splits(
        train=TensorDataset(x[tr], y[tr]),
        val=TensorDataset(x[va], y[va]),
        test=TensorDataset(x[te], y[te]),
        num_classes=10,
        in_chans=1,
        image_size=image_size,
        class_names=[str(c) for c in range(10)],
        name="digits",
    )


def pair_table(seed: int = 0) -> torch.Tensor:
    """The digit-pair task's ``[10, 10]`` int64 label table: a fixed random class in 0..9 for
    each ordered pair of digits (left, right)."""
    return torch.randint(0, 10, (10, 10), generator=torch.Generator().manual_seed(seed))


def _compose_pairs(images: torch.Tensor, digits: torch.Tensor, pool: np.ndarray, n: int, gen: torch.Generator):
    """``n`` 16 x 16 canvases, each with two 8 x 8 digits drawn from ``pool``: one in the left
    half, one in the right, each at its own random height (0-8 rows down). Returns the canvases
    ``[n, 1, 16, 16]`` and the two digits' labels ``[n, 2]``."""
    pool_t = torch.as_tensor(pool)
    pick = pool_t[torch.randint(0, len(pool_t), (n, 2), generator=gen)]  # [n, 2] image indices
    drop = torch.randint(0, 9, (n, 2), generator=gen)  # rows down, per half
    padded = F.pad(images, (0, 0, 8, 8))  # [N, 24, 8]: 8 blank rows above and below
    rows = torch.arange(16)
    canvas = torch.empty(n, 16, 16)
    for half in range(2):
        src = 8 + rows.unsqueeze(0) - drop[:, half : half + 1]  # [n, 16] rows of the padded digit
        canvas[:, :, 8 * half : 8 * half + 8] = padded[pick[:, half].unsqueeze(1), src]
    return canvas.unsqueeze(1), digits[pick]


def load_digit_pairs(
    n_train: int = 60_000, n_val: int = 2_000, n_test: int = 4_000, *, seed: int = 0, table_seed: int = 0
) -> Splits:
    """A data-rich, capacity-bound task made from scikit-learn's digits (no download): each
    16 x 16 image holds two 8 x 8 digits side by side (each at a random height) and its class is
    ``pair_table(table_seed)[left, right]``, a fixed random label for each of the 100 ordered
    pairs. A model must read both digits and hold a 100-entry lookup table: knowledge, which
    parameters buy, rather than arithmetic, which FLOPs buy.

    The digits themselves are split as ``load_digits`` splits them (70 / 15 / 15 %, stratified,
    seed 0), so no 8 x 8 digit image of the validation or test pairs is seen in training.
    ``seed`` draws the pairs and heights. Pixels are scaled to [0, 1] and standardised with the
    training pairs' mean and standard deviation."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0  # [1797, 8, 8]
    digits = torch.tensor(d.target, dtype=torch.int64)
    tr, va, te = _split_indices(d.target, 0.15, 0.15, 0)
    table = pair_table(table_seed)
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for pool, n in ((tr, n_train), (va, n_val), (te, n_test)):
        x, pair = _compose_pairs(images, digits, pool, n, gen)
        parts.append((x, table[pair[:, 0], pair[:, 1]]))
    mean, std = parts[0][0].mean(), parts[0][0].std()
    (xtr, ytr), (xva, yva), (xte, yte) = [((x - mean) / std, y) for x, y in parts]
    return Splits(
        train=TensorDataset(xtr, ytr),
        val=TensorDataset(xva, yva),
        test=TensorDataset(xte, yte),
        num_classes=10,
        in_chans=1,
        image_size=16,
        class_names=[str(c) for c in range(10)],
        name="digit-pairs",
    )


def load_image_folder(
    root: str, image_size: int = 224, *, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0
) -> Splits:
    """An ``ImageFolder`` tree (torchvision): resized to ``image_size`` (shorter side, then a
    centre crop), RGB, normalised to [-1, 1]. ``root/train`` + ``root/val`` (+ ``root/test``;
    without it the validation split doubles as test) or one tree split by class-stratified
    fractions."""
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )

    def folder(path):
        return datasets.ImageFolder(path, transform=tf)

    sub = {s: os.path.join(root, s) for s in ("train", "val", "validation", "test")}
    if os.path.isdir(sub["train"]) and (os.path.isdir(sub["val"]) or os.path.isdir(sub["validation"])):
        train = folder(sub["train"])
        val = folder(sub["val"] if os.path.isdir(sub["val"]) else sub["validation"])
        test = folder(sub["test"]) if os.path.isdir(sub["test"]) else val
        classes = train.classes
    else:
        full = folder(root)
        tr, va, te = _split_indices(np.array(full.targets), val_frac, test_frac, seed)
        train, val, test = Subset(full, tr.tolist()), Subset(full, va.tolist()), Subset(full, te.tolist())
        classes = full.classes
    return Splits(
        train=train,
        val=val,
        test=test,
        num_classes=len(classes),
        in_chans=3,
        image_size=image_size,
        class_names=list(classes),
        name=os.path.basename(os.path.normpath(root)),
    )


def load_dataset(name: str = "digits", image_size: int | None = None, *, seed: int = 0) -> Splits:
    """``"digits"`` (default image size 16), ``"digit-pairs"`` (16 only) or the path of an image
    folder (default 224)."""
    if name == "digits":
        return load_digits(image_size or 16, seed=seed)
    if name == "digit-pairs":
        if image_size not in (None, 16):
            raise ValueError(f"image_size for 'digit-pairs' must be 16 (or None), got {image_size}")
        return load_digit_pairs(seed=seed)
    if os.path.isdir(name):
        return load_image_folder(name, image_size or 224, seed=seed)
    raise ValueError(f"dataset must be 'digits', 'digit-pairs' or an existing image folder, got {name!r}")


def labels_of(ds: Dataset) -> torch.Tensor:
    """``[len(ds)]`` int64 labels, without decoding images where the dataset allows."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1]
    if isinstance(ds, Subset) and hasattr(ds.dataset, "targets"):
        return torch.as_tensor(np.asarray(ds.dataset.targets)[ds.indices], dtype=torch.int64)
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets, dtype=torch.int64)
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.int64)

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

__all__ = ["Splits", "labels_of", "load_dataset", "load_digits", "load_image_folder"]


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
    """``"digits"`` (default image size 16) or the path of an image folder (default 224)."""
    if name == "digits":
        return load_digits(image_size or 16, seed=seed)
    if os.path.isdir(name):
        return load_image_folder(name, image_size or 224, seed=seed)
    raise ValueError(f"dataset must be 'digits' or an existing image folder, got {name!r}")


def labels_of(ds: Dataset) -> torch.Tensor:
    """``[len(ds)]`` int64 labels, without decoding images where the dataset allows."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1]
    if isinstance(ds, Subset) and hasattr(ds.dataset, "targets"):
        return torch.as_tensor(np.asarray(ds.dataset.targets)[ds.indices], dtype=torch.int64)
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets, dtype=torch.int64)
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.int64)

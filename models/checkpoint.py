"""Checkpoint I/O of the training runs: weights as safetensors with the run config (and
Mobile V-MoE's super-classes) in the metadata, and the JSON metrics files."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from models.build import build_model

__all__ = ["load_checkpoint", "save_checkpoint", "write_json"]


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, written whole (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_checkpoint(model: nn.Module, cfg: dict, path: str, superclass=None) -> None:
    """Weights as safetensors, with the run config (and super-classes) in its metadata."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps(cfg)}
    if superclass is not None:
        meta["superclasses"] = json.dumps([int(s) for s in superclass])
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)
    # safetensors creates the file 0600; give it the mode every other file gets (the umask's).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_checkpoint(path: str):
    """``(model, cfg, superclass or None)`` from a ``save_checkpoint`` file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    cfg = json.loads(meta["config"])
    model = build_model(cfg)
    model.load_state_dict(load_file(path))
    sc = meta.get("superclasses")
    return model, cfg, (torch.tensor(json.loads(sc)) if sc else None)

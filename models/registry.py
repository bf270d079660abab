"""One model registry for the reference models, timm-style: small explicit factory functions,
registered by name.

Each factory belongs to a family (``"vmoe"``: V-MoE and its dense ViT twins, DESIGN.md section
6; ``"soft_moe"``: Soft MoE ViTs, also in ``models.vmoe``; ``"mobile_vmoe"``: Mobile V-MoE,
section 5) under the variant name its family's ``create_model`` (``create_soft_moe``) takes
(``"B/16"``, ``"tiny"``), and is also reachable by a timm-style name (``"vmoe_b16"``,
``"soft_moe_s16"``, ``"mobile_vmoe_tiny"``)::

    from models import registry
    registry.list_models("vmoe")                 # ['Nano/4', 'Mu/4', ..., 'H/14']
    model = registry.create_model("vmoe_s32", num_experts=8, num_classes=10)

``models.vmoe.create_model`` and ``models.mobile_vmoe.create_model`` are the families' own
entry points with their documented defaults; both look their factories up here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

__all__ = ["create_model", "get_factory", "list_models", "register_model", "timm_name"]

# (family, variant) -> factory, in registration order.
_FACTORIES: dict[tuple[str, str], Callable[..., nn.Module]] = {}


def timm_name(family: str, variant: str) -> str:
    """``("vmoe", "B/16") -> "vmoe_b16"``; ``("mobile_vmoe", "9x192") -> "mobile_vmoe_9x192"``."""
    return f"{family}_{re.sub(r'[^0-9a-z]+', '', variant.lower())}"


def register_model(family: str, variant: str) -> Callable:
    """Decorator: register ``fn`` as ``family``'s ``variant`` (a name registered twice is an error)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = (family, variant)
        if key in _FACTORIES or timm_name(family, variant) in _by_timm_name():
            raise ValueError(f"model {family}/{variant} is already registered")
        _FACTORIES[key] = fn
        return fn

    return wrap


def _by_timm_name() -> dict[str, tuple[str, str]]:
    return {timm_name(f, v): (f, v) for f, v in _FACTORIES}


def list_models(family: str | None = None) -> list[str]:
    """The variants of ``family`` (``"vmoe"``, ``"soft_moe"``, ``"mobile_vmoe"``), or every
    timm-style name."""
    _load_families()
    if family is None:  # families in alphabetical order, each in registration order
        return [timm_name(f, v) for fam in sorted({f for f, _ in _FACTORIES}) for f, v in _FACTORIES if f == fam]
    families = sorted({f for f, _ in _FACTORIES})
    if family not in families:
        raise ValueError(f"unknown model family {family!r}; families: {families}")
    return [v for f, v in _FACTORIES if f == family]


def get_factory(family: str, variant: str) -> Callable[..., nn.Module]:
    """The factory of ``family``'s ``variant``; an error lists the registered ones."""
    _load_families()
    try:
        return _FACTORIES[(family, variant)]
    except KeyError:
        raise ValueError(f"unknown {family} variant {variant!r}; registered: {list_models(family)}") from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered under the timm-style ``name`` (``list_models()``), passing
    ``kwargs`` to its factory (see the family's ``create_model`` for what they mean)."""
    _load_families()
    by_name = _by_timm_name()
    if name not in by_name:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}")
    return _FACTORIES[by_name[name]](**kwargs)


def _load_families() -> None:
    # Importing a family module runs its @register_model decorators.
    from models import mobile_vmoe, vmoe  # noqa: F401 (vmoe: the soft_moe family too)

"""Model factory: build a ConvNeXt variant by its timm name (the names in ``registry.VARIANTS``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pretrain.models.registry import VARIANTS

if TYPE_CHECKING:
    from pretrain.models.convnext import ConvNeXt

__all__ = ["create_model", "list_models"]


def list_models() -> list[str]:
    """Variant names, smallest first."""
    return list(VARIANTS)


def create_model(name: str, **kwargs: Any) -> "ConvNeXt":
    """Build a randomly initialised variant.

    Args:
        name: A ``registry.VARIANTS`` name, e.g. ``"convnext_xlarge"``.
        **kwargs: ``ConvNeXt`` options (``num_classes``, ``drop_path_rate``, ``layer_scale_init``,
            ``head_init_scale``, ``in_chans``, ``checkpoint_stages``). Build under
            ``with torch.device("meta"):`` to get shapes without memory.

    Raises:
        ValueError: Unknown name.
    """
    from pretrain.models.convnext import ConvNeXt  # torch only when a model is built, not for configs

    variant = VARIANTS.get(name)
    if variant is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(VARIANTS)}")
    return ConvNeXt(variant.depths, variant.dims, conv_mlp=variant.conv_mlp, **kwargs)

"""Load pretrained ConvNeXt weights from the official (facebookresearch) or timm layout.

Our parameter names are timm's, so timm ``.pth`` / ``.safetensors`` files load as they are, and the
official release files (``{"model": state_dict}`` with ``downsample_layers.*`` / ``dwconv`` /
``pwconv*`` names) are renamed on the fly. ``.pth`` files are read with ``weights_only=True``: a
checkpoint must be tensors (in plain containers), never pickled objects.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pretrain import storage
from pretrain.config import StorageConfig

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "_orig_mod.")
_TIMM_EXAMPLE = "'stem.0.weight', 'stages.0.blocks.0.conv_dw.weight', 'head.norm.weight', 'head.fc.weight'"
_OFFICIAL_EXAMPLE = "'downsample_layers.0.0.weight', 'stages.0.0.dwconv.weight', 'norm.weight', 'head.weight'"
_RENAMES = (  # applied in order to each official key
    (re.compile(r"^downsample_layers\.0\."), "stem."),
    (re.compile(r"^downsample_layers\.(\d+)\.(\d+)\."), r"stages.\1.downsample.\2."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"\.dwconv\."), ".conv_dw."),
    (re.compile(r"\.pwconv([12])\."), r".mlp.fc\1."),
    (re.compile(r"^head\."), "head.fc."),
    (re.compile(r"^norm\."), "head.norm."),
)


def official_to_timm(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict:
    """Rename a facebookresearch ConvNeXt state dict to our (= timm's) keys.

    Args:
        state_dict: Official-layout tensors (already unwrapped from ``{"model": ...}``).
        model: If given, 2-D MLP weights are reshaped to the model's [out, in, 1, 1] where it has them.

    Returns:
        A new dict in timm layout.
    """
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return _match_shapes(out, model) if model is not None else out


def as_conv_1x1(shape: Sequence[int], model_shape: Sequence[int]) -> bool:
    """Whether a 2-D Linear weight of `shape` is the model's [out, in, 1, 1] 1x1-conv weight."""
    return len(shape) == 2 and tuple(model_shape) == (*shape, 1, 1)


def _match_shapes(state_dict: dict, model: nn.Module) -> dict:
    """Reshape 2-D Linear weights where the model stores them as 1x1 convs ([out, in, 1, 1])."""
    target = model.state_dict()
    for key, value in state_dict.items():
        ref = target.get(key)
        if ref is not None and as_conv_1x1(value.shape, ref.shape):
            state_dict[key] = value.reshape(ref.shape)
    return state_dict


def _unwrap(obj: Any, use_ema: bool) -> dict:
    """Pick the state dict out of a checkpoint dict and strip DDP / torch.compile prefixes."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    wrappers = (("state_dict_ema", "model_ema") if use_ema else ()) + ("state_dict", "model")
    if use_ema and not any(k in obj for k in wrappers[:2]) and any(k in obj for k in wrappers[-2:]):
        log.warning("use_ema=True but the checkpoint has no 'state_dict_ema'/'model_ema'; "
                    "loading the plain weights")
    for key in wrappers:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    out = {}
    for key, value in obj.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _is_safetensors(head: bytes) -> bool:
    """A u64 header length, then the JSON header (torch.save files are zip archives: 'PK')."""
    return not head.startswith(b"PK") and head[8:9] == b"{"


def _read(url: str, storage_cfg: StorageConfig | None = None) -> Any:
    """A ``.pth`` (torch.save) or ``.safetensors`` file, told apart by content, not by name."""
    with storage.open_url(url, "rb", storage_cfg) as f:
        head = f.read(9)
        f.seek(0)
        if _is_safetensors(head):
            from safetensors.torch import load as load_safetensors

            return load_safetensors(f.read())
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{url}: cannot be loaded with torch.load(weights_only=True) (it holds pickled objects, "
                f"e.g. a training checkpoint's 'args'); save only the model's tensors: {e}") from e


def safetensors_shapes(url: str, storage_cfg: StorageConfig | None = None) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes (our key layout) from a ``.safetensors`` header, in two small reads; None for a ``.pth``.

    Lets ``model.init_from`` be checked against the model before Ray starts, without reading the weights.
    """
    head = storage.read_bytes(url, storage_cfg, 0, 9)
    if not _is_safetensors(head):
        return None
    size = int.from_bytes(head[:8], "little")
    try:
        header = json.loads(storage.read_bytes(url, storage_cfg, 8, 8 + size))
    except ValueError as exc:
        raise ValueError(f"{url}: unreadable safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    return to_timm_layout({k: tuple(v["shape"]) for k, v in header.items()}, use_ema=False, name=url)


def to_timm_layout(obj: Any, use_ema: bool = False, name: str = "state dict") -> dict:
    """The state dict in a checkpoint object, in our (= timm's) key layout.

    Unwraps ``{"model": ...}`` / ``{"state_dict_ema": ...}`` (EMA first with `use_ema`), strips DDP and
    torch.compile prefixes and renames official keys. Values pass through untouched (tensors or shapes).

    Raises:
        ValueError: Not a ConvNeXt state dict in either layout.
    """
    state_dict = _unwrap(obj, use_ema)
    if any(k.startswith("downsample_layers.") for k in state_dict):
        return official_to_timm(state_dict)
    if not any(k.startswith(("stem.", "head.norm.")) for k in state_dict):
        found = ", ".join(repr(k) for k in list(state_dict)[:5]) or "none"
        raise ValueError(
            f"{name}: not a ConvNeXt state dict. Expected timm-layout keys such as {_TIMM_EXAMPLE} or "
            f"official keys such as {_OFFICIAL_EXAMPLE} (optionally under 'model', 'state_dict', "
            f"'model_ema' or 'state_dict_ema'); found keys: {found}")
    return state_dict


def read_state_dict(source: str | os.PathLike, use_ema: bool = False,
                    storage_cfg: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """The tensors of an official- or timm-layout ``.pth`` / ``.safetensors`` file, in our key layout."""
    name = os.fspath(source)
    return to_timm_layout(_read(name, storage_cfg), use_ema, name)


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, Any], strict: bool = True,
                 use_ema: bool = False, storage_cfg: StorageConfig | None = None) -> Any:
    """Load official- or timm-layout ConvNeXt weights into ``model``.

    Args:
        model: A ``ConvNeXt`` (or timm's) model.
        source: A local path, ``file://`` or ``s3://`` URL of a ``.pth`` / ``.safetensors`` file, or an
            already-loaded (possibly wrapped) state dict.
        strict: As in ``nn.Module.load_state_dict``.
        use_ema: Prefer the EMA weights (``state_dict_ema`` / ``model_ema``) when present.
        storage_cfg: S3 endpoint and credentials for ``s3://`` sources.

    Returns:
        The ``load_state_dict`` result (missing and unexpected keys).

    Raises:
        ValueError: The source is not a ConvNeXt state dict in either layout.
    """
    if isinstance(source, (str, os.PathLike)):
        state_dict = read_state_dict(source, use_ema, storage_cfg)
    else:
        state_dict = to_timm_layout(source, use_ema)
    return model.load_state_dict(_match_shapes(state_dict, model), strict=strict)

"""``model.init_from``: the weights a new run starts from (fine-tuning), checked before Ray starts.

Sources, told apart by what is at the URL:

- a **run.url** (it has ``checkpoints/``): its newest committed checkpoint, the EMA or the model
  weights (``model.init_from_ema``), consolidated from any world size and ZeRO stage by
  :mod:`pretrain.export`;
- a **weights file**: a ``pretrain export`` .safetensors, a timm .pth / .safetensors or an official
  ``{"model": ...}`` .pth (:mod:`pretrain.models.weights`).

Every tensor except the classifier must have this model's shape. ConvNeXt has no position embeddings,
so weights trained at 224 px load unchanged into a 384 px run; another variant or layer scale on in one
and off in the other is a :class:`ConfigError` naming the key and both shapes. The final norm
(``head.norm``) is always loaded; the classifier (``head.fc``) follows ``model.head_from``. The driver
checks a source from its metadata alone (a run's manifest, a safetensors header); a ``.pth`` can only
be checked by loading it, in the workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from pretrain import state_format, storage
from pretrain.checkpoint import CHECKPOINTS, CheckpointError
from pretrain.config import ConfigError, ModelConfig, StorageConfig
from pretrain.data.shards import load_synsets
from pretrain.export import committed_checkpoint
from pretrain.models import create_model
from pretrain.models.weights import as_conv_1x1, load_weights, read_state_dict, safetensors_shapes

log = logging.getLogger(__name__)

HEAD = ("head.fc.weight", "head.fc.bias")
IN22K_SYNSETS = "imagenet22k_synsets"
"""timm's 21,841-synset list: the row order of the released fb_in22k heads and of runs on 22k synset shards."""

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Source:
    """A resolved ``model.init_from``; resolved once (rank 0) so that every rank loads the same checkpoint."""

    url: str
    """The weights file, or the run's checkpoint directory."""
    run_url: str = ""
    step: int | None = None
    shapes: Shapes | None = None
    """Every tensor's shape (our key layout), when known without reading the weights."""
    classes: tuple[str, ...] | None = None
    """The class names of the head's rows (a run's training classes)."""


def locate(cfg: ModelConfig, storage_cfg: StorageConfig | None = None) -> Source:
    """Resolve ``cfg.init_from`` from its metadata: a run's newest committed checkpoint, or a file."""
    url = cfg.init_from
    try:
        if storage.exists(storage.join(url, CHECKPOINTS), storage_cfg):
            return _locate_run(cfg, storage_cfg)
        if storage.exists(url, storage_cfg):
            return Source(url, shapes=safetensors_shapes(url, storage_cfg))
    except ConfigError:
        raise
    except PermissionError as exc:
        raise ConfigError(f"model.init_from: access to {url} is denied ({exc}); check the credentials the job "
                          "runs with") from None
    except (IsADirectoryError, FileNotFoundError):
        raise ConfigError(f"model.init_from: {url} is neither a weights file nor a run.url with committed "
                          "checkpoints") from None
    except ValueError as exc:  # an unreadable safetensors header
        raise ConfigError(f"model.init_from: {exc}") from None
    raise ConfigError(f"model.init_from: {url} does not exist (expected a run.url with committed checkpoints, "
                      "or a .safetensors / .pth weights file)")


def _locate_run(cfg: ModelConfig, storage_cfg: StorageConfig | None) -> Source:
    try:
        with committed_checkpoint(cfg.init_from, storage_cfg=storage_cfg) as ckpt:
            record, url = ckpt.record, ckpt.url
    except CheckpointError as exc:
        raise ConfigError(f"model.init_from: {exc}") from None
    if cfg.init_from_ema and not record.run.ema_enabled:
        raise ConfigError(f"model.init_from_ema: {url} has no EMA (ema.enabled was false in that run); set "
                          "model.init_from_ema = false to start from its model weights")
    tables = state_format.rank_tables(record.fragment_tables)
    return Source(url, cfg.init_from, record.step, state_format.parameter_shapes(tables.values()),
                  tuple(record.run.classes) or None)


def check(cfg: ModelConfig, classes: list[str], storage_cfg: StorageConfig | None = None) -> Source:
    """Preflight: the source exists, reads, and (where its metadata tells the shapes) fits this model."""
    source = locate(cfg, storage_cfg)
    if source.shapes is not None:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = create_model(cfg.name, num_classes=cfg.num_classes, layer_scale_init=cfg.layer_scale_init)
        head_plan(source, source.shapes, model_shapes(model), cfg, classes)
    return source


def model_shapes(model: nn.Module) -> Shapes:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def head_plan(source: Source, shapes: Shapes, target: Shapes, cfg: ModelConfig,
              classes: list[str]) -> str | list[int | None]:
    """Check every non-head tensor, then decide the head: 'keep', 'fresh', or one source row per class."""
    _check_body(source, shapes, target, cfg)
    src, dst = shapes.get(HEAD[0]), target[HEAD[0]]
    mode = cfg.head_from
    if mode == "auto":
        mode = "keep" if src == dst and shapes.get(HEAD[1]) == target[HEAD[1]] else "fresh"
    if mode == "keep" and src != dst:
        raise ConfigError(f"model.head_from = 'keep': {HEAD[0]} is {_shape(src)} in {source.url} but {list(dst)} in "
                          f"this model (model.num_classes = {cfg.num_classes}); valid: 'fresh' (a new head x "
                          "model.head_init_scale) or 'match_classes' (the source's rows of the same classes)")
    if mode != "match_classes":
        return mode
    if src is None:
        raise ConfigError(f"model.head_from = 'match_classes': {source.url} has no classifier ({HEAD[0]}); valid: "
                          "'fresh'")
    names = source.classes or (tuple(load_synsets(IN22K_SYNSETS)) if src[0] == 21841 else None)
    if names is None or len(names) != src[0]:
        raise ConfigError(f"model.head_from = 'match_classes': the class names of the {src[0]} rows of "
                          f"{source.url}'s head are unknown (a weights file names them only for a 21,841-class "
                          "ImageNet-22k head, in timm's synset order); use the run.url it was exported from, or "
                          "'fresh'")
    if len(classes) != dst[0]:
        raise ConfigError(f"model.num_classes = {cfg.num_classes} but the training set has {len(classes)} classes")
    position = {name: i for i, name in enumerate(names)}
    rows = [position.get(name) for name in classes]
    if all(r is None for r in rows):
        raise ConfigError(f"model.head_from = 'match_classes': none of the training classes ({list(classes[:3])}, "
                          f"...) is a class of {source.url} ({list(names[:3])}, ...); valid: 'fresh'")
    return rows


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else str(list(shape))


def _check_body(source: Source, shapes: Shapes, target: Shapes, cfg: ModelConfig) -> None:
    body = {k: v for k, v in target.items() if k not in HEAD}
    wrong = [k for k, v in body.items() if k in shapes and shapes[k] != v and not as_conv_1x1(shapes[k], v)]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            f"model.init_from: {k} is {list(shapes[k])} in {source.url} but {list(body[k])} in this {cfg.name} "
            f"({len(wrong)} tensor(s) differ); every tensor but the classifier must have the model's shape (the "
            "image size may differ: ConvNeXt has no position embeddings). Set model.name to the source's variant")
    missing = [k for k in body if k not in shapes]
    extra = [k for k in shapes if k not in target and k not in HEAD]
    if missing or extra:
        gammas = [k for k in missing + extra if k.endswith("gamma")]
        hint = (f"layer scale (gamma) is in only one of them: set model.layer_scale_init "
                f"{'= 0' if gammas[0] in missing else '> 0'}" if gammas else f"is it a {cfg.name}? (model.name)")
        parts = ([f"lacks {len(missing)} tensor(s) of this model ({missing[:3]})"] if missing else []) + (
            [f"has {len(extra)} this model lacks ({extra[:3]})"] if extra else [])
        raise ConfigError(f"model.init_from: {source.url} {', '.join(parts)}; {hint}")


def read(source: Source, cfg: ModelConfig, storage_cfg: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """The source's tensors (our key layout)."""
    if source.run_url:
        try:
            with committed_checkpoint(source.run_url, source.step, storage_cfg) as ckpt:
                return ckpt.weights(cfg.init_from_ema)
        except CheckpointError as exc:
            raise ConfigError(f"model.init_from: {exc}") from None
    return read_state_dict(source.url, cfg.init_from_ema, storage_cfg)


@torch.no_grad()
def initialize(model: nn.Module, cfg: ModelConfig, classes: list[str], storage_cfg: StorageConfig | None = None,
               source: Source | None = None) -> None:
    """Load ``cfg.init_from`` into a freshly built `model` (its own head is the fresh one).

    Args:
        model: Built with ``cfg`` (``head_init_scale`` already applied to its classifier).
        cfg: The model section.
        classes: The training set's class names (one per head row).
        storage_cfg: S3 endpoint and credentials.
        source: ``locate(cfg)`` as rank 0 resolved it; resolved here when None.
    """
    source = source or locate(cfg, storage_cfg)
    state = read(source, cfg, storage_cfg)
    plan = head_plan(source, {k: tuple(v.shape) for k, v in state.items()}, model_shapes(model), cfg, classes)
    own = model.state_dict()
    head = {k: own[k].clone() for k in HEAD}  # fresh, scaled by head_init_scale
    if plan == "keep":
        head = {k: state[k] for k in HEAD}
    elif isinstance(plan, list):
        found = [i for i, row in enumerate(plan) if row is not None]
        for k in HEAD:
            head[k][found] = state[k][[plan[i] for i in found]].to(head[k].dtype)
    load_weights(model, {**{k: v for k, v in state.items() if k not in HEAD}, **head})
    what = f"{'EMA' if cfg.init_from_ema else 'model'} weights of {source.url}" if source.run_url else source.url
    if isinstance(plan, list):
        fresh = [classes[i] for i, row in enumerate(plan) if row is None]
        log.info("model.init_from: %s; head: %d of %d rows from the source's rows of the same classes, %d fresh "
                 "(x head_init_scale %g)%s", what, len(plan) - len(fresh), len(plan), len(fresh), cfg.head_init_scale,
                 f": {fresh[:10]}" if fresh else "")
    else:
        log.info("model.init_from: %s; head: %s", what,
                 "the source's" if plan == "keep" else f"fresh (x head_init_scale {cfg.head_init_scale:g})")


@torch.no_grad()
def initialize_backbone(backbone: nn.Module, cfg: ModelConfig, storage_cfg: StorageConfig | None = None,
                        source: Source | None = None) -> None:
    """Dense tasks: the source's ConvNeXt body (every key but ``head.*``) into `backbone`, a ConvNeXt whose
    classifier was removed; the task's own heads stay freshly initialised."""
    source = source or locate(cfg, storage_cfg)
    state = {k: v for k, v in read(source, cfg, storage_cfg).items() if not k.startswith("head.")}
    _check_body(source, {k: tuple(v.shape) for k, v in state.items()}, model_shapes(backbone), cfg)
    load_weights(backbone, state)
    log.info("model.init_from: the backbone of %s (%s weights); task heads fresh", source.url,
             "EMA" if cfg.init_from_ema and source.run_url else "model")


def resolve(cfg: ModelConfig, storage_cfg: StorageConfig | None, resuming: bool) -> Source | None:
    """The source every rank loads, resolved by rank 0 (a live run's newest checkpoint may change while the
    ranks look); None without ``model.init_from`` or when the run resumes from its own checkpoints."""
    if not cfg.init_from or resuming:
        return None
    from pretrain.engine.distributed import on_rank0

    return on_rank0(lambda: locate(cfg, storage_cfg))

"""Enumerate the images of a source dataset and assign label ids, without copying anything.

Three layouts are understood, local or behind any fsspec URL (all I/O goes through
:mod:`pretrain.storage`):

* ``folder``: an ImageFolder tree, one sub-folder per class (files are found recursively).
* ``tars``: a folder of per-class tar files (``n01440764.tar`` ...), the ImageNet-22k winter21
  "whole" layout. Members are listed with :mod:`tarfile` once, remembering each member's data offset
  and size, and read later with one ranged read into the tar -- 1.3 TB is never extracted to disk.
* ``list``: a text file with one ``path_or_url<TAB>label`` per line (whitespace if there is no tab);
  relative paths are relative to the list file.

Segmentation sources (:func:`list_segmentation`) pair each image with its label mask:

* ``ade``: the ADE20K layout, ``images/<split>/**/x.jpg`` + ``annotations/<split>/**/x.png`` (paired by
  path without extension; an image without mask, or a mask without image, is skipped and counted).
* ``list``: one ``image_path mask_path`` per line (tab or whitespace; relative to the list file).

Segmentation classes come from a class file (one name per line in label-id order, i.e. after
``reduce_zero_label``: the first line names mask value 1 of an ADE-style mask), given with
``--classes`` or found as ``classes.txt`` in an ``ade`` root (``data-tools synth --task segmentation``
writes one); without one, make-shards names ``class_<value>`` every mask value up to the largest seen.

Label ids: when every class name is a WordNet synset in timm's 21,841-synset ImageNet-22k list, ids
are positions in that list and the class list is the whole list (``imagenet22k_synsets``), so heads
stay compatible with released ``fb_in22k`` weights. Otherwise ids follow sorted class names
(``sorted``, ImageFolder's rule); a list file whose labels are all integers uses them (``list``).
"""

from __future__ import annotations

import functools
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from pretrain import storage
from pretrain.config import StorageConfig
from pretrain.data.reader import SKIP_MISSING_IMAGE, SKIP_MISSING_MASK  # the same words as at training time
from pretrain.data.shards import load_synsets

TASKS = ("classification", "segmentation")
SOURCE_TYPES = ("auto", "folder", "tars", "list", "ade")
SEGMENTATION_SOURCE_TYPES = ("auto", "ade", "list")
CLASSES_FILE = "classes.txt"
LABEL_MODES = ("auto", "in22k", "sorted")
IN22K = "imagenet22k_synsets"

# Listing-time skip reasons (read/decode-time reasons live in make_shards and pretrain.data.decode).
SKIP_UNREADABLE_TAR = "unreadable_tar"
SKIP_OUTSIDE_CLASS = "outside_class_folder"
SKIP_BAD_LIST_LINE = "bad_list_line"


class InputError(ValueError):
    """A problem the user can fix (missing source, bad URL, mismatched destination); exit code 2."""


class UnreadableMember(OSError):
    """A tar member's bytes could not be read in full (truncated or damaged tar)."""


@dataclass(frozen=True, slots=True)
class Item:
    """One input image. ``offset >= 0`` marks a tar member whose data starts at that byte of ``url``."""

    url: str
    """Where to read it (absolute local path or URL)."""
    name: str
    """Stable display name, relative to the source root (``cls/x.jpg``, ``n01.tar/n01_1.JPEG``)."""
    class_name: str
    size: int
    offset: int = -1
    mask: Item | None = None
    """Segmentation: the label mask that goes with this image."""


@dataclass
class Listing:
    source_type: str
    items: list[Item]
    classes: list[str]
    """Label id -> class name."""
    label_source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(reason, name) of inputs rejected while listing."""
    task: str = "classification"
    reduce_zero_label: bool = False
    """Segmentation: mask value 0 is "other" (ignored), value k is class k - 1."""

    def __post_init__(self) -> None:
        self.label_ids = {name: i for i, name in enumerate(self.classes)}

    def label(self, item: Item) -> int:
        """The class id of a classification item; -1 for a segmentation item (its labels are pixels)."""
        return -1 if item.mask is not None else self.label_ids[item.class_name]


MapFn = Callable[[Callable, Iterable], Iterator]


def detect_type(src: str, storage_cfg: StorageConfig | None = None) -> str:
    fs, path = storage.filesystem(src, storage_cfg)
    if not fs.exists(path):
        raise InputError(f"source {src!r} does not exist; give an ImageFolder directory, a folder of "
                         "per-class .tar files, or a list file (path<TAB>label per line)")
    if fs.isfile(path):
        return "list"
    entries = fs.ls(path, detail=True)
    visible = [e for e in entries if not posixpath.basename(e["name"].rstrip("/")).startswith(".")]
    if any(e["type"] == "directory" for e in visible):
        return "folder"
    if any(e["name"].lower().endswith(".tar") for e in visible):
        return "tars"
    raise InputError(f"source {src!r} has neither class sub-folders nor .tar files; valid sources: an "
                     "ImageFolder directory, a folder of per-class .tar files, or a list file")


def list_source(src: str, source_type: str = "auto", labels: str = "auto",
                storage_cfg: StorageConfig | None = None, map_fn: MapFn = map) -> Listing:
    """All items of `src`, sorted by name, with their label assignment.

    `map_fn` lists tar files in parallel (a process pool or Ray); it must preserve order.
    """
    if source_type not in SOURCE_TYPES or source_type == "ade":
        raise InputError(f"--source-type must be one of {SOURCE_TYPES[:-1]} for classification, got "
                         f"{source_type!r} (ade is a segmentation layout: add --task segmentation)")
    if labels not in LABEL_MODES:
        raise InputError(f"--labels must be one of {LABEL_MODES}, got {labels!r}")
    if not storage.is_remote(src):
        src = os.path.abspath(src.split("://", 1)[-1])  # items must stay readable from pool/Ray workers
    kind = detect_type(src, storage_cfg) if source_type == "auto" else source_type
    if source_type != "auto" and not storage.exists(src, storage_cfg):
        raise InputError(f"source {src!r} does not exist")
    if kind == "folder":
        items, class_names, skipped = _list_folder(src, storage_cfg)
    elif kind == "tars":
        items, class_names, skipped = _list_tars(src, storage_cfg, map_fn)
    else:
        items, class_names, skipped = _list_file(src, storage_cfg)
    if not items:
        raise InputError(f"source {src!r} ({kind}) contains no images")
    classes, label_source = assign_labels(class_names, labels, integer_labels=kind == "list")
    if label_source == "list":  # "007" and "7" name the same integer class
        items = [Item(it.url, it.name, str(int(it.class_name)), it.size, it.offset) for it in items]
    items.sort(key=lambda it: (it.name, it.offset))
    return Listing(kind, items, classes, label_source, sorted(skipped))


def assign_labels(class_names: Iterable[str], mode: str = "auto",
                  integer_labels: bool = False) -> tuple[list[str], str]:
    """(classes, label_source) for the class names found in a source."""
    names = sorted(set(class_names))
    if mode in ("auto", "in22k"):
        synsets = in22k_synsets()
        known = set(synsets)
        missing = [n for n in names if n not in known]
        if not missing:
            return synsets, IN22K
        if mode == "in22k":
            raise InputError(f"--labels in22k: {len(missing)} class name(s) are not ImageNet-22k synsets "
                             f"(e.g. {missing[:5]}); use --labels sorted")
    if mode == "auto" and integer_labels and all(_is_int(n) for n in names):
        top = max(int(n) for n in names)
        if min(int(n) for n in names) < 0:
            raise InputError("list file labels must be >= 0")
        return [str(i) for i in range(top + 1)], "list"
    return names, "sorted"


@functools.lru_cache(maxsize=1)
def in22k_synsets() -> list[str]:
    """timm's ImageNet-22k synset list (label order of the released fb_in22k heads)."""
    return load_synsets(IN22K)


def read_item(item: Item, storage_cfg: StorageConfig | None = None) -> bytes:
    """The bytes of one item: the whole file, or a tar member via one ranged read."""
    if item.offset < 0:
        return storage.read_bytes(item.url, storage_cfg)
    data = storage.read_bytes(item.url, storage_cfg, item.offset, item.offset + item.size)
    if len(data) != item.size:
        raise UnreadableMember(f"{item.name}: read {len(data)} of {item.size} bytes (tar truncated?)")
    return data


def list_tar(url: str, storage_cfg: StorageConfig | None = None) -> tuple[list[tuple[str, int, int]], str]:
    """(name, data offset, size) of the regular members of one tar, and an error message if listing
    stopped early. Members whose data lies past the end of a truncated tar are still listed; reading
    them fails later and is counted then."""
    members: list[tuple[str, int, int]] = []
    try:
        with storage.open_url(url, "rb", storage_cfg, block_size=1 << 20) as f:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf:
                    if m.isfile():
                        members.append((m.name, m.offset_data, m.size))
    except (tarfile.TarError, OSError, EOFError) as exc:
        return members, f"{type(exc).__name__}: {exc}"
    return members, ""


def _list_tar_args(args: tuple[str, StorageConfig | None]) -> tuple[list[tuple[str, int, int]], str]:
    return list_tar(*args)


def _root(src: str, storage_cfg: StorageConfig | None) -> tuple[object, str]:
    fs, path = storage.filesystem(src, storage_cfg)
    return fs, path.rstrip("/")


def _url_of(src: str, rel: str) -> str:
    return storage.join(src, *rel.split("/"))


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _list_folder(src: str, storage_cfg: StorageConfig | None):
    fs, root = _root(src, storage_cfg)
    class_names = [posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(root, detail=True)
                   if e["type"] == "directory"]
    class_names = [c for c in class_names if not c.startswith(".")]
    items, skipped = [], []
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root) + 1:]
        if not path.startswith(root + "/") or _hidden(rel):
            continue
        if "/" not in rel:
            skipped.append((SKIP_OUTSIDE_CLASS, rel))
            continue
        items.append(Item(_url_of(src, rel), rel, rel.split("/", 1)[0], int(info.get("size") or 0)))
    return items, class_names, skipped


def _list_tars(src: str, storage_cfg: StorageConfig | None, map_fn: MapFn):
    fs, root = _root(src, storage_cfg)
    tars = sorted(posixpath.basename(p) for p in fs.ls(root, detail=False)
                  if p.lower().endswith(".tar") and not posixpath.basename(p).startswith("."))
    urls = [storage.join(src, t) for t in tars]
    items, skipped, class_names = [], [], []
    listed = map_fn(_list_tar_args, [(u, storage_cfg) for u in urls])
    for tar, url, (members, error) in zip(tars, urls, listed):
        class_name = tar[: -len(".tar")]
        class_names.append(class_name)
        if error and not members:
            skipped.append((SKIP_UNREADABLE_TAR, f"{tar} ({error})"))
        for name, offset, size in members:
            items.append(Item(url, f"{tar}/{name}", class_name, size, offset))
    return items, class_names, skipped


def _list_lines(src: str, storage_cfg: StorageConfig | None):
    """(url, path, second column) per line of a list file, the lines that do not parse, and a
    resolver of paths relative to the list file."""
    text = storage.read_bytes(src, storage_cfg).decode("utf-8")
    base = src.rsplit("/", 1)[0] if "://" in src else os.path.dirname(os.path.abspath(src))

    def resolve(path: str) -> str:
        return path if "://" in path or os.path.isabs(path) else storage.join(base, path)

    entries, skipped = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit("\t", 1) if "\t" in line else line.rsplit(None, 1)
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            skipped.append((SKIP_BAD_LIST_LINE, f"line {lineno}: {line[:200]}"))
            continue
        path, second = parts[0].strip(), parts[1].strip()
        entries.append((resolve(path), path, second))
    return entries, skipped, resolve


def _list_file(src: str, storage_cfg: StorageConfig | None):
    entries, skipped, _ = _list_lines(src, storage_cfg)
    sizes = _sizes([url for url, _, _ in entries], storage_cfg)
    items = [Item(url, path, label, sizes.get(url, 0)) for url, path, label in entries]
    return items, [label for _, _, label in entries], skipped


# --------------------------------------------------------------------------------------------------
# Segmentation: image + label-mask pairs


def list_segmentation(src: str, source_type: str = "auto", split: str = "training", classes_file: str = "",
                      reduce_zero_label: bool | None = None,
                      storage_cfg: StorageConfig | None = None) -> Listing:
    """All (image, mask) pairs of `src`, sorted by image name. `reduce_zero_label` None means: on for
    the ADE20K layout (its 0 = "other" convention), off for a list file. Classes come from
    `classes_file`, else ``classes.txt`` in an ade root, else (an empty list here) from the masks."""
    if source_type not in SEGMENTATION_SOURCE_TYPES:
        raise InputError(f"--source-type must be one of {SEGMENTATION_SOURCE_TYPES} with --task "
                         f"segmentation, got {source_type!r}")
    if not storage.is_remote(src):
        src = os.path.abspath(src.split("://", 1)[-1])
    if not storage.exists(src, storage_cfg):
        raise InputError(f"source {src!r} does not exist; give an ADE20K-style root (images/<split>/, "
                         "annotations/<split>/) or a list file (image_path mask_path per line)")
    fs, path = storage.filesystem(src, storage_cfg)
    kind = source_type if source_type != "auto" else "list" if fs.isfile(path) else "ade"
    items, skipped = _list_ade(src, split, storage_cfg) if kind == "ade" else _list_pairs(src, storage_cfg)
    if not items:
        raise InputError(f"source {src!r} ({kind}) contains no image/mask pairs")
    if not classes_file and kind == "ade" and storage.exists(storage.join(src, CLASSES_FILE), storage_cfg):
        classes_file = storage.join(src, CLASSES_FILE)
    classes = []
    if classes_file:
        try:
            text = storage.read_bytes(classes_file, storage_cfg).decode("utf-8")
        except FileNotFoundError:
            raise InputError(f"--classes {classes_file!r} does not exist") from None
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    reduce = kind == "ade" if reduce_zero_label is None else reduce_zero_label
    items.sort(key=lambda it: it.name)
    return Listing(kind, items, classes, "classes_file" if classes else "max_label", sorted(skipped),
                   task="segmentation", reduce_zero_label=reduce)


def _list_ade(src: str, split: str, storage_cfg: StorageConfig | None):
    fs, root = _root(src, storage_cfg)
    found: dict[str, dict[str, tuple[str, int]]] = {}
    for kind in ("images", "annotations"):
        base = f"{root}/{kind}/{split}"
        if not fs.isdir(base):
            raise InputError(f"source {src!r} has no {kind}/{split}/ folder; the ADE20K layout is images/"
                             "<split>/*.jpg + annotations/<split>/*.png (--split training|validation)")
        found[kind] = {posixpath.splitext(path[len(base) + 1:])[0]:
                       (f"{kind}/{split}/{path[len(base) + 1:]}", int(info.get("size") or 0))
                       for path, info in sorted(fs.find(base, detail=True).items())
                       if not _hidden(path[len(base) + 1:])}
    images, masks = found["images"], found["annotations"]
    items, skipped = [], [(SKIP_MISSING_IMAGE, rel) for stem, (rel, _) in masks.items() if stem not in images]
    for stem, (rel, size) in images.items():
        if stem not in masks:
            skipped.append((SKIP_MISSING_MASK, rel))
            continue
        mask_rel, mask_size = masks[stem]
        mask = Item(_url_of(src, mask_rel), mask_rel, "", mask_size)
        items.append(Item(_url_of(src, rel), rel, "", size, mask=mask))
    return items, skipped


def _list_pairs(src: str, storage_cfg: StorageConfig | None):
    entries, skipped, resolve = _list_lines(src, storage_cfg)
    pairs = [(url, path, resolve(mask), mask) for url, path, mask in entries]
    sizes = _sizes([u for url, _, mask_url, _ in pairs for u in (url, mask_url)], storage_cfg)
    items = [Item(url, path, "", sizes.get(url, 0), mask=Item(mask_url, mask, "", sizes.get(mask_url, 0)))
             for url, path, mask_url, mask in pairs]
    return items, skipped


def _sizes(urls: list[str], storage_cfg: StorageConfig | None) -> dict[str, int]:
    """File sizes (for splitting shards by bytes), one directory listing per remote parent instead of
    one request per file; missing files get size 0 and fail (counted) when read."""
    sizes: dict[str, int] = {}
    parents: dict[str, list[str]] = {}
    for url in urls:
        if storage.is_remote(url):
            parents.setdefault(url.rsplit("/", 1)[0], []).append(url)
        else:
            try:
                sizes[url] = os.path.getsize(storage.filesystem(url, storage_cfg)[1])
            except OSError:
                sizes[url] = 0
    for parent, members in parents.items():
        fs, path = storage.filesystem(parent, storage_cfg)
        try:
            listed = {posixpath.basename(e["name"]): int(e.get("size") or 0)
                      for e in fs.ls(path, detail=True)}
        except (FileNotFoundError, OSError):
            listed = {}
        for url in members:
            sizes[url] = listed.get(url.rsplit("/", 1)[1], 0)
    return sizes


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True

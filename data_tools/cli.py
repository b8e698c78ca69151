"""``data-tools``: offline data preparation (synthetic data, shard building, verification, inspection).

Kept apart from the training CLI because it runs on different machines at different times (a CPU
cluster converting ImageNet-22k once), and thin: argument parsing here, work in the modules.

    data-tools synth OUT_DIR --classes N --per-class M --size S [--seed 0] [--holdout K]
    data-tools synth OUT_DIR --task segmentation --classes N --images M [--size S] [--holdout K]
    data-tools make-shards SRC DEST_URL [--shard-samples N] [--shard-bytes B] [--max-side PX] [--ray [ADDR]]
    data-tools make-shards ADE_ROOT|LIST DEST_URL --task segmentation [--split validation] [--classes FILE]
    data-tools verify URL [--decode-sample N]
    data-tools inspect URL --out grid.png [--augmented] [--n 32] [--image-size 224]

Exit codes: 0 success, 1 verification failed or shards could not be built (re-run resumes),
2 a problem the user can fix (bad arguments, missing source, unsupported URL, mismatched destination).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from data_tools.sources import LABEL_MODES, SOURCE_TYPES, TASKS, InputError
from pretrain import storage
from pretrain.config import ConfigError, StorageConfig

_URL_SCHEMES = ("file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "http", "https", "memory")


def _check_url(url: str, what: str) -> str:
    if not url.strip():
        raise InputError(f"{what} is empty; give a local path or an s3:// URL")
    scheme = storage.protocol(url)
    if scheme not in _URL_SCHEMES:
        raise InputError(f"{what} {url!r}: unsupported URL scheme {scheme!r}; valid: a local path, "
                         f"file://, s3://bucket/prefix (or {', '.join(s + '://' for s in _URL_SCHEMES[4:])})")
    if scheme in ("s3", "s3a") and not url.split("://", 1)[1].strip("/"):
        raise InputError(f"{what} {url!r} names no bucket; use s3://bucket/prefix")
    return url


def _size(text: str) -> int:
    """'1000000000', '1e9', '1G', '500MB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a byte count like 1e9, 500M or 1G, got {text!r}")
    return int(float(match.group(1)) * 1000 ** " kmgt".index(match.group(2).lower() or " "))


def _storage(args: argparse.Namespace) -> StorageConfig:
    return StorageConfig(endpoint_url=args.endpoint_url or "")


def build_parser() -> argparse.ArgumentParser:
    from data_tools.make_shards import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES

    parser = argparse.ArgumentParser(prog="data-tools", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a learnable synthetic ImageFolder (or segmentation set)",
                       description="Write OUT_DIR/class_000/00000.jpg ...: classes are shape/colour/texture "
                                   "combinations with random pose, backgrounds, distractors and noise. "
                                   "--task segmentation writes ADE20K-style scenes of 1-4 such shapes with "
                                   "exact masks: OUT_DIR/images/training/00000.jpg, "
                                   "OUT_DIR/annotations/training/00000.png (0 = other, k = class k-1), "
                                   "OUT_DIR/classes.txt.")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--task", choices=TASKS, default="classification")
    p.add_argument("--classes", type=int, required=True, help="number of classes (1..280)")
    p.add_argument("--per-class", type=int, default=0, help="training images per class (classification)")
    p.add_argument("--images", type=int, default=0, help="training scenes (segmentation)")
    p.add_argument("--size", type=int, default=0, help="image side in pixels (default 64; segmentation 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=int, default=0, metavar="K",
                   help="also write K images per class to a separate held-out ImageFolder (segmentation: "
                        "K scenes to images/validation + annotations/validation)")
    p.add_argument("--holdout-dir", default="", help="where the held-out images go (default OUT_DIR_holdout)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")

    p = sub.add_parser("make-shards", help="convert images into shuffled WebDataset shards (+ .idx)",
                       description="Build, or resume building, a shard set at DEST_URL from SRC: an "
                                   "ImageFolder, a folder of per-class .tar files, or a list file "
                                   "(path<TAB>label per line). With --task segmentation: an ADE20K-style "
                                   "root (images/<split>/, annotations/<split>/) or a list file "
                                   "(image_path mask_path per line).")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dest", metavar="DEST_URL", help="local directory, file:// or s3://bucket/prefix")
    p.add_argument("--task", choices=TASKS, default="classification",
                   help="segmentation: samples are jpg + png label mask + json")
    p.add_argument("--source-type", choices=SOURCE_TYPES, default="auto",
                   help="classification: folder, tars or list; segmentation: ade or list")
    p.add_argument("--split", default="training", help="segmentation, ADE layout: the split to shard "
                                                       "(training or validation; default training)")
    p.add_argument("--classes", default="", metavar="FILE",
                   help="segmentation: class names, one per line in label-id order (after "
                        "--reduce-zero-label); default SRC/classes.txt if present, else class_<value> up to "
                        "the largest mask value")
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                   help="segmentation: mask value 0 is 'other' (ignored) and k is class k-1 (default: on for "
                        "the ADE layout, off for a list file)")
    p.add_argument("--labels", choices=LABEL_MODES, default="auto",
                   help="auto: ImageNet-22k synset order when all classes are synsets, integer labels of "
                        "a list file as given, else sorted class names")
    p.add_argument("--seed", type=int, default=0, help="global shuffle seed")
    p.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES,
                   help=f"max samples per shard (default {DEFAULT_SHARD_SAMPLES})")
    p.add_argument("--shard-bytes", type=_size, default=DEFAULT_SHARD_BYTES,
                   help=f"max estimated bytes per shard, e.g. 1G (default {DEFAULT_SHARD_BYTES:.0e})")
    p.add_argument("--max-side", type=int, default=0, metavar="PX",
                   help="re-encode images whose longer side exceeds PX (0 = keep originals)")
    p.add_argument("--workers", type=int, default=0,
                   help="local processes, or CPUs of a local Ray (default: all cores)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="build shards as Ray tasks; without ADDRESS a local Ray is started")
    p.add_argument("--endpoint-url", default="",
                   help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("verify", help="check every shard against the manifest and decode a sample",
                       description="Check sizes, sha256, sample counts and .idx offsets of every shard; "
                                   "exit 1 on any mismatch.")
    p.add_argument("url", metavar="URL")
    p.add_argument("--decode-sample", type=int, default=64, metavar="N",
                   help="images to decode, chosen at random (-1 = all; default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--endpoint-url", default="")

    p = sub.add_parser("inspect", help="write a labelled contact sheet of samples (PNG)",
                       description="Random samples labelled id:class, raw or after the training transform.")
    p.add_argument("url", metavar="URL")
    p.add_argument("--out", required=True, help="PNG to write (local path or URL)")
    p.add_argument("--augmented", action="store_true", help="show the training transform's output")
    p.add_argument("--n", type=int, default=32, help="number of samples (default 32)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--endpoint-url", default="")
    return parser


def _synth(args: argparse.Namespace) -> int:
    from data_tools.synth import make_dataset, make_segmentation_dataset

    out, workers = _check_url(args.out_dir, "OUT_DIR"), args.workers or len(os.sched_getaffinity(0))
    if args.task == "segmentation":
        if args.per_class or args.holdout_dir:
            raise InputError("--per-class and --holdout-dir are classification options; segmentation takes "
                             "--images (and --holdout for validation scenes)")
        summary = make_segmentation_dataset(out, args.classes, args.images, args.size or 128, seed=args.seed,
                                            holdout=args.holdout, workers=workers)
    else:
        if args.images:
            raise InputError("--images is a segmentation option (--task segmentation); classification takes "
                             "--per-class")
        summary = make_dataset(out, args.classes, args.per_class, args.size or 64, seed=args.seed,
                               holdout=args.holdout, holdout_dir=args.holdout_dir, workers=workers)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def _make_shards(args: argparse.Namespace) -> int:
    from data_tools.make_shards import BuildParams, make_shards
    from pretrain.data import shards

    cfg = _storage(args)
    dest = _check_url(args.dest, "DEST_URL")
    if args.task != "segmentation" and (args.classes or args.reduce_zero_label is not None
                                        or args.split != "training"):
        raise InputError("--classes, --split and --reduce-zero-label need --task segmentation")
    manifest = make_shards(
        _check_url(args.src, "SRC"), dest, source_type=args.source_type, labels=args.labels,
        params=BuildParams(seed=args.seed, shard_samples=args.shard_samples, shard_bytes=args.shard_bytes,
                           max_side=args.max_side),
        workers=args.workers, ray_address=args.ray, storage_cfg=cfg, progress=not args.no_progress,
        log=lambda line: print(line, file=sys.stderr), task=args.task, split=args.split,
        classes_file=args.classes, reduce_zero_label=args.reduce_zero_label)
    gb = sum(s.bytes for s in manifest.shards) / 1e9
    skipped = sum(manifest.skipped.values())
    print(f"wrote {len(manifest.shards)} shards, {manifest.num_samples:,} samples, {gb:.3f} GB, "
          f"{manifest.num_classes:,} classes ({manifest.label_source}) to {dest}")
    if skipped:
        print(f"skipped {skipped} input(s): {manifest.skipped}; see {storage.join(dest, shards.REPORT)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_tools.verify import verify

    report = verify(_check_url(args.url, "URL"), args.decode_sample, args.seed, storage_cfg=_storage(args))
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    from data_tools.inspect_shards import contact_sheet

    count = contact_sheet(_check_url(args.url, "URL"), _check_url(args.out, "--out"), args.n, args.image_size,
                          args.augmented, args.seed, _storage(args))
    print(f"wrote {args.out} ({count} samples{', augmented' if args.augmented else ''})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data_tools.make_shards import ShardBuildError

    commands = {"synth": _synth, "make-shards": _make_shards, "verify": _verify, "inspect": _inspect}
    try:
        return commands[args.command](args)
    except ShardBuildError as exc:
        print(f"data-tools {args.command}: {exc}", file=sys.stderr)
        return 1
    except (InputError, ConfigError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"data-tools {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"data-tools {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

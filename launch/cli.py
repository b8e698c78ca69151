"""The `pretrain` command: train, submit/status/logs/stop (Ray Jobs), export, config.

Imports stay inside the subcommands so that `pretrain --help` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import sys

from pretrain.config import ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML config file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), typed by the field, e.g. --set optim.lr=1e-3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="Cluster-scale ConvNeXt pretraining.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train (local Ray by default; --address joins a cluster)",
                       description="Run training. By default starts a local Ray on this machine and runs "
                                   "launch.num_workers DeepSpeed workers there; rerunning the same command "
                                   "resumes from the latest committed checkpoint under run.url.")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster address (overrides launch.address)")
    p.add_argument("--launcher", choices=["ray", "torchrun"], default="ray",
                   help="ray (default) or torchrun (one node, no Ray)")
    p.add_argument("--takeover", action="store_true",
                   help="take the run's lease if its holder's heartbeat is older than lease.timeout_s")

    p = sub.add_parser("submit", help="submit a training job to a Ray cluster through the Jobs API")
    _add_config_args(p)
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default: .)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="forward this environment variable's value to the job (repeatable; never for secrets)")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends")

    for name, text in (("status", "show a submitted job's status"), ("logs", "print a submitted job's logs"),
                       ("stop", "stop a submitted job (workers checkpoint first)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("submission_id")
        p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
        if name == "logs":
            p.add_argument("--follow", action="store_true")

    p = sub.add_parser("export", help="consolidate a checkpoint into timm-compatible safetensors + model card")
    p.add_argument("run_url", help="the run's run.url (local path or s3://...)")
    p.add_argument("out", help="output .safetensors path (a .json model card is written next to it)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest committed)")
    p.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS environment)")

    p = sub.add_parser("config", help="validate a config and print it resolved (or --explain the fields)")
    _add_config_args(p)
    p.add_argument("--explain", action="store_true", help="print every key with its documentation")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pretrain.run_errors import FatalRunError

    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"pretrain {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except FatalRunError as exc:
        print(f"pretrain {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        return _config(args)
    if args.command == "export":
        return _export(args)
    if args.command == "train":
        from pretrain.config import load_config

        cfg = load_config(args.config, args.set + (["lease.takeover=true"] if args.takeover else []))
        if args.launcher == "torchrun":
            from launch.torchrun import run_torchrun

            return run_torchrun(cfg)
        from launch.ray_train import run_training

        return run_training(cfg, address=args.address)
    from launch import jobs

    if args.command == "submit":
        return jobs.submit(args)
    return {"status": jobs.status, "logs": jobs.logs, "stop": jobs.stop}[args.command](args)


def _config(args: argparse.Namespace) -> int:
    from pretrain import config as config_mod

    cfg = config_mod.load_config(args.config, args.set)
    if not args.explain:
        print(config_mod.dump_toml(cfg), end="")
        return 0
    for section in config_mod.config_to_dict(cfg):
        cls = type(getattr(cfg, section))
        docs = config_mod.section_docs(cls)
        print(f"[{section}]")
        for key, value in config_mod.config_to_dict(getattr(cfg, section)).items():
            print(f"  {key} = {value!r}" + (f"    # {docs[key]}" if key in docs else ""))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import StorageConfig
    from pretrain.export import export

    try:
        result = export(args.run_url, args.out, ema=args.ema, step=args.step,
                        storage_cfg=StorageConfig(endpoint_url=args.endpoint_url))
    except CheckpointError as exc:
        print(f"pretrain export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

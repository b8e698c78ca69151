"""`make demo`: the whole path on one machine, in a few minutes on 2 CPU cores.

1. an S3 endpoint: moto's server on loopback, unless AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL is set;
2. `data-tools synth` -> `data-tools make-shards` into s3://convnext-demo/shards/{train,holdout};
3. `pretrain train --config configs/demo.toml`: Ray runs 2 DeepSpeed ZeRO-2 workers (bf16, EMA),
   streaming from S3, TensorBoard and checkpoints on S3;
4. one worker is SIGKILLed after a checkpoint is committed: Ray restarts the group, which resumes;
5. the EMA weights are exported to safetensors, loaded with timm and scored on the held-out set;
6. with --finetune (`make demo-finetune`, no kill in step 4): a second synthetic label set (20 classes, 10
   the pretraining never saw, another seed) is sharded, and `pretrain train --config configs/demo_finetune.toml`
   fine-tunes the demo run's checkpoint on it at 48 px (`model.init_from` = the demo's run.url), with the
   held-out accuracy of its starting point (pretrained body, fresh head) and of the result.
Everything it started is stopped at the end; outputs stay in demo_out/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "s3://convnext-demo"
HOLDOUT = f"{BUCKET}/shards/holdout"
FINETUNE_HOLDOUT = f"{BUCKET}/shards/finetune/holdout"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _find_train_workers() -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::RayTrainWorker"):
            found.append(proc)
    return found


SHOWN = ("step ", "eval at", "resuming", "starting:", "committed checkpoint", "status:", "loss:", "checkpoints:",
         "tensorboard:", "pretrain train:", "model.init_from:")


def _stream(proc: subprocess.Popen, lines: list[str]) -> None:
    """Echo the training's progress lines (Ray's own diagnostics stay in the captured log)."""
    noted = False
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if "TrainController" in line or "(raylet)" in line:
            if not noted and ("ActorDiedError" in line or "worker died" in line.lower()):
                print("   | Ray: a training worker died; restarting the worker group", flush=True)
                noted = True
            continue
        if any(key in line for key in SHOWN):
            print("   | " + line.rstrip()[-200:], flush=True)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "demo_out"), help="local outputs (default: demo_out/)")
    parser.add_argument("--no-kill", action="store_true", help="skip the worker kill / recovery step")
    parser.add_argument("--finetune", action="store_true",
                        help="then fine-tune the demo's checkpoint on a second label set at 48 px (implies --no-kill)")
    args = parser.parse_args(argv)

    from launch.local_s3 import start_local_s3
    from pretrain import storage

    started = time.monotonic()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    server = None
    if not (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
        server = start_local_s3(log_path=str(out / "moto.log"))
        os.environ.update(server.env)
        say(f"started a local S3 endpoint (moto) at {server.endpoint}")
    else:
        say(f"using the configured S3 endpoint {os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ['AWS_ENDPOINT_URL']}")
    try:
        for run in ("demo", "demo-finetune"):  # a previous demo's runs on a persistent endpoint
            storage.remove_tree(f"{BUCKET}/runs/{run}")
        code = _demo(out, args.no_kill or args.finetune, started)
        return _finetune(out, started) if code == 0 and args.finetune else code
    finally:
        if server is not None:
            server.stop()
            say("stopped the local S3 endpoint")


def _demo(out: Path, no_kill: bool, started: float) -> int:
    from data_tools.make_shards import BuildParams, make_shards
    from data_tools.synth import make_dataset
    from pretrain import storage
    from pretrain.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.toml")
    say("data-tools synth: 10 classes x 300 training + 50 held-out images, 48 px")
    make_dataset(str(out / "data" / "train"), classes=10, per_class=300, size=48, seed=0, holdout=50,
                 workers=os.cpu_count() or 1)
    storage.ensure_bucket(BUCKET)
    for split, folder in (("train", "train"), ("holdout", "train_holdout")):
        url = {"train": cfg.data.train_url, "holdout": HOLDOUT}[split]
        say(f"data-tools make-shards {out / 'data' / folder} {url}")
        make_shards(str(out / "data" / folder), url, params=BuildParams(shard_samples=500), progress=False)

    say(f"pretrain train --config configs/demo.toml --set data.eval_url={HOLDOUT}  ({cfg.launch.num_workers} Ray "
        f"workers, ZeRO-{cfg.zero.stage} "
        f"{cfg.precision.dtype}, EMA, run.url={cfg.run.url})")
    lines: list[str] = []
    proc, reader = _train("configs/demo.toml", HOLDOUT, lines)
    killed = None if no_kill else _kill_a_worker_after_a_checkpoint(proc, cfg)
    code = _wait(proc, reader, lines, "training")
    return code if code else _finish(out, cfg, lines, killed, started)


def _train(config: str, eval_url: str, lines: list[str]) -> tuple[subprocess.Popen, threading.Thread]:
    """`pretrain train --config CONFIG --set data.eval_url=EVAL_URL`, its progress lines echoed."""
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--config", config,
                             "--set", f"data.eval_url={eval_url}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    reader = threading.Thread(target=_stream, args=(proc, lines), daemon=True)
    reader.start()
    return proc, reader


def _wait(proc, reader, lines: list[str], what: str) -> int:
    """The exit code of a `pretrain train` started by `_train`; on failure its last lines are shown."""
    code = proc.wait()
    reader.join(timeout=10)
    if code != 0:
        print("".join(lines[-60:]), file=sys.stderr)
        say(f"{what} failed (exit code {code})")
    return code


def _top1(model, folder: Path, classes: list[str], image_size: int, crop_pct: float) -> tuple[float, int]:
    """Top-1 of `model` (an NCHW float classifier) on an ImageFolder, with the training's eval transform."""
    import torch

    from pretrain.config import DataConfig
    from pretrain.data.decode import decode_rgb
    from pretrain.data.transforms import build_eval_transform

    transform = build_eval_transform(DataConfig(image_size=image_size, crop_pct=crop_pct))
    correct = total = 0
    with torch.no_grad():
        for label, name in enumerate(classes):
            for path in sorted((folder / name).iterdir()):
                x = transform(decode_rgb(path.read_bytes())).unsqueeze(0)
                correct += int(model(x).argmax(1).item() == label)
                total += 1
    return correct / total, total


def _kill_a_worker_after_a_checkpoint(proc: subprocess.Popen, cfg) -> int | None:
    """SIGKILL one training worker once the second checkpoint is committed (Ray must recover)."""
    from pretrain import storage

    step = 2 * cfg.checkpoint.every_steps
    marker = storage.join(cfg.run.url, "checkpoints", f"step_{step}", "manifest.json")
    while proc.poll() is None and not storage.exists(marker):
        time.sleep(1)
    time.sleep(5)  # a few steps past the checkpoint, so that they are lost and redone
    workers = _find_train_workers()
    if proc.poll() is not None or not workers:
        return None
    victim = workers[-1]
    say(f"SIGKILL training worker pid {victim.pid} (checkpoint step_{step} is committed); "
        "Ray will restart the worker group and resume from it")
    victim.send_signal(signal.SIGKILL)
    return step


def _finish(out: Path, cfg, lines: list[str], killed: int | None, started: float) -> int:
    import timm

    from pretrain import storage
    from pretrain.export import export

    resumed = [line for line in lines if "resuming at step" in line]
    weights = out / "convnext_atto_demo_ema.safetensors"
    say(f"pretrain export {cfg.run.url} {weights} --ema")
    result = export(cfg.run.url, str(weights), ema=True)
    card = json.loads(Path(result["card"]).read_text())
    model = timm.create_model(cfg.model.name, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=cfg.model.num_classes)).eval()
    classes = card["classes"]
    top1, total = _top1(model, out / "data" / "train_holdout", classes, cfg.data.image_size, cfg.data.crop_pct)
    tb_local = out / "tb"
    tb_remote = storage.join(cfg.run.url, "tb")
    tb_local.mkdir(exist_ok=True)
    for name in storage.listdir(tb_remote):
        (tb_local / name).write_bytes(storage.read_bytes(storage.join(tb_remote, name)))
    checkpoints = storage.listdir(storage.join(cfg.run.url, "checkpoints"))
    metrics = card.get("metrics") or {}
    say("summary")
    print(f"   steps:               {card['step']} (global batch {cfg.schedule.global_batch_size}, "
          f"{cfg.launch.num_workers} workers)")
    if metrics.get("loss_first") is not None:
        print(f"   loss:                {metrics['loss_first']:.3f} at the first step -> "
              f"{metrics['loss_last']:.3f} at the last")
    resumed_at = re.search(r"resuming at step (\d+)", resumed[-1]).group(1) if resumed else None
    print("   recovery:            " + (f"worker killed after step_{killed}; Ray restarted the group, which "
                                         f"resumed at step {resumed_at}" if killed and resumed_at else "not exercised"))
    print(f"   held-out top-1:      {top1:.1%} on {total} images with timm + the exported EMA weights "
          f"(chance {1 / len(classes):.0%})")
    if "ema_top1" in metrics:
        print(f"   in-training eval:    model {metrics['model_top1']:.1%}, EMA {metrics['ema_top1']:.1%}")
    print(f"   checkpoints on S3:   {storage.join(cfg.run.url, 'checkpoints')}/{{{','.join(checkpoints)}}}")
    print(f"   exported weights:    {weights} (+ {Path(result['card']).name})")
    print(f"   TensorBoard:         tensorboard --logdir {tb_local}   (events copied from {tb_remote})")
    print(f"   took:                {(time.monotonic() - started) / 60:.1f} min")
    return 0


def _finetune(out: Path, started: float) -> int:
    """Fine-tune the demo's checkpoint on a second label set at a higher resolution; top-1 before and after."""
    import timm
    import torch

    from data_tools.make_shards import BuildParams, make_shards
    from data_tools.synth import make_dataset
    from pretrain.build import build_model
    from pretrain.config import load_config
    from pretrain.data.shards import read_manifest
    from pretrain.export import export
    from pretrain.init_from import locate
    from pretrain.tasks import build_task

    cfg = load_config(ROOT / "configs" / "demo_finetune.toml")
    data = out / "data" / "finetune"
    say(f"data-tools synth: a second label set, {cfg.model.num_classes} classes (10 the demo never saw) x 150 "
        "training + 50 held-out images, 64 px, another seed")
    make_dataset(str(data / "train"), classes=cfg.model.num_classes, per_class=150, size=64, seed=1, holdout=50,
                 workers=os.cpu_count() or 1)
    for folder, url in (("train", cfg.data.train_url), ("train_holdout", FINETUNE_HOLDOUT)):
        make_shards(str(data / folder), url, params=BuildParams(shard_samples=500), progress=False, log=lambda _: None)
    manifest = read_manifest(cfg.data.train_url, cfg.storage)
    size, crop = cfg.data.image_size, cfg.data.crop_pct
    # The run's starting point, built as its workers build it: the demo run's weights, a fresh head x 0.001.
    start = build_model(build_task(cfg, manifest, torch.device("cpu")), cfg.model, cfg.run.seed,
                        locate(cfg.model, cfg.storage), manifest.classes, cfg.storage).eval()
    before, total = _top1(start, data / "train_holdout", manifest.classes, size, crop)
    weights_of = "EMA" if cfg.model.init_from_ema else "model"
    say(f"before fine-tuning (the demo run's {weights_of} weights, a fresh head): held-out top-1 {before:.1%} on "
        f"{total} images (chance {1 / manifest.num_classes:.0%})")

    say(f"pretrain train --config configs/demo_finetune.toml --set data.eval_url={FINETUNE_HOLDOUT}  "
        f"(model.init_from={cfg.model.init_from}, {size} px instead of 32, layer decay {cfg.optim.layer_decay}, "
        f"head x {cfg.model.head_init_scale}, run.url={cfg.run.url})")
    lines: list[str] = []
    proc, reader = _train("configs/demo_finetune.toml", FINETUNE_HOLDOUT, lines)
    code = _wait(proc, reader, lines, "fine-tuning")
    if code:
        return code
    weights = out / "convnext_atto_demo_finetune_ema.safetensors"
    result = export(cfg.run.url, str(weights), ema=True)
    tuned = timm.create_model(cfg.model.name, pretrained=True, pretrained_cfg_overlay=dict(
        file=str(weights), num_classes=cfg.model.num_classes)).eval()
    after, _ = _top1(tuned, data / "train_holdout", manifest.classes, size, crop)
    say("fine-tuning summary")
    print(f"   from:                {cfg.model.init_from} (the demo's run, {weights_of} weights), "
          f"{cfg.schedule.steps} steps at {size} px on {manifest.num_samples} images of {manifest.num_classes} classes")
    print(f"   held-out top-1:      {before:.1%} before (pretrained body, fresh head) -> {after:.1%} after, on {total} "
          f"images (chance {1 / manifest.num_classes:.0%}); timm + the exported EMA weights")
    print(f"   exported weights:    {weights} (+ {Path(result['card']).name})")
    print(f"   took:                {(time.monotonic() - started) / 60:.1f} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(run())

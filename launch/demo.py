"""`make demo`: the whole path on one machine, in a few minutes on 2 CPU cores.

1. an S3 endpoint: moto's server on loopback, unless AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL is set;
2. `data-tools synth` -> `data-tools make-shards` into s3://convnext-demo/shards/{train,holdout};
3. `pretrain train --config configs/demo.toml`: Ray runs 2 DeepSpeed ZeRO-2 workers (bf16, EMA),
   streaming from S3, TensorBoard and checkpoints on S3;
4. one worker is SIGKILLed after a checkpoint is committed: Ray restarts the group, which resumes;
5. the EMA weights are exported to safetensors, loaded with timm and scored on the held-out set.
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
         "tensorboard:", "pretrain train:")


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
        storage.remove_tree(BUCKET + "/runs/demo")  # a previous demo's run on a persistent endpoint
        return _demo(out, args.no_kill, started)
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
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--config", "configs/demo.toml",
                             "--set", f"data.eval_url={HOLDOUT}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=_stream, args=(proc, lines), daemon=True)
    reader.start()
    killed = None if no_kill else _kill_a_worker_after_a_checkpoint(proc, cfg)
    code = proc.wait()
    reader.join(timeout=10)
    if code != 0:
        print("".join(lines[-60:]), file=sys.stderr)
        say(f"training failed (exit code {code})")
        return code
    return _finish(out, cfg, lines, killed, started)


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
    import torch

    from pretrain import storage
    from pretrain.config import DataConfig
    from pretrain.data.decode import decode_rgb
    from pretrain.data.transforms import build_eval_transform
    from pretrain.export import export

    resumed = [line for line in lines if "resuming at step" in line]
    weights = out / "convnext_atto_demo_ema.safetensors"
    say(f"pretrain export {cfg.run.url} {weights} --ema")
    result = export(cfg.run.url, str(weights), ema=True)
    card = json.loads(Path(result["card"]).read_text())
    model = timm.create_model(cfg.model.name, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=cfg.model.num_classes)).eval()
    transform = build_eval_transform(DataConfig(image_size=cfg.data.image_size, crop_pct=cfg.data.crop_pct))
    classes = card["classes"]
    correct = total = 0
    with torch.no_grad():
        for label, name in enumerate(classes):
            for path in sorted((out / "data" / "train_holdout" / name).iterdir()):
                x = transform(decode_rgb(path.read_bytes())).unsqueeze(0)
                correct += int(model(x).argmax(1).item() == label)
                total += 1
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
    print(f"   held-out top-1:      {correct / total:.1%} on {total} images with timm + the exported EMA weights "
          f"(chance {1 / len(classes):.0%})")
    if "ema_top1" in metrics:
        print(f"   in-training eval:    model {metrics['model_top1']:.1%}, EMA {metrics['ema_top1']:.1%}")
    print(f"   checkpoints on S3:   {storage.join(cfg.run.url, 'checkpoints')}/{{{','.join(checkpoints)}}}")
    print(f"   exported weights:    {weights} (+ {Path(result['card']).name})")
    print(f"   TensorBoard:         tensorboard --logdir {tb_local}   (events copied from {tb_remote})")
    print(f"   took:                {(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(run())

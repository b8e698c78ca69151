"""`make gpu-check` / `python -m benchmarks.gpu_check`: prove the GPU path on one GPU in minutes.

    python -m benchmarks.gpu_check [--dry-run] [--out DIR] [--steps N] [--keep]

On one GPU (H100/H200: about 6-8 minutes, no network), through the product's own entry point
(`pretrain train --launcher torchrun`, NCCL, world size 1) on shards generated locally:

1. ConvNeXt-XL with the 22k recipe's settings (224 px, bf16, ZeRO-2 with overlap and auto buckets,
   fp32 reductions, EMA, AdamW) for ``--steps`` steps, eager and with ``model.compile``: images/s,
   step time, MFU against a measured bf16 matmul peak, peak memory, data wait and input stall;
2. resume: the eager run again from its mid-run checkpoint; the final weights are compared with the
   uninterrupted run's (on GPU within bf16 tolerance: the max difference is reported);
3. the fp16 path (dynamic loss scaling) for 20 steps, and the optimizer choices (torch foreach,
   torch fused = ``auto``, DeepSpeed FusedAdam, which is JIT-built and may fail: reported);
4. the benchmark suite's GPU rows (`python -m benchmarks --quick --only model_step,mfu`).

Writes ``<out>/<gpu>-<date>.{md,json}`` (default out: benchmarks/results). ``--dry-run`` runs the same
code path on CPU with convnext_atto at 32 px for a few steps (fp16 and DeepSpeed FusedAdam are
reported as skipped there: DeepSpeed supports fp16 only on CUDA, FusedAdam would JIT-compile C++);
the test suite runs it. Every figure is a measurement of this run; nothing is projected.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "convnext_xlarge_in22k.toml"
CLASSES = 64


def _log(text: str) -> None:
    print(f"[gpu-check] {text}", flush=True)


class Check:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.dry = args.dry_run
        self.cuda = torch.cuda.is_available()
        if not self.dry and not self.cuda:
            raise SystemExit("gpu_check: no CUDA device; use --dry-run to run the same code path on CPU")
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.device = torch.cuda.get_device_name(0) if self.cuda else platform.processor() or "cpu"
        self.steps = args.steps or (6 if self.dry else 50)
        self.started = time.monotonic()
        self.rows: list[dict] = []
        self.runs: dict[str, dict] = {}

    # --------------------------------------------------------------------------------------- set-up

    def data(self) -> str:
        from data_tools.make_shards import BuildParams, make_shards
        from data_tools.synth import make_dataset

        size, per_class = (48, 4) if self.dry else (256, 40)
        folder = self.work / "images"
        make_dataset(str(folder), classes=CLASSES, per_class=per_class, size=size, seed=0, workers=os.cpu_count() or 1)
        url = str(self.work / "shards")
        make_shards(str(folder), url, params=BuildParams(shard_samples=256), workers=os.cpu_count() or 1,
                    progress=False, log=lambda _: None)
        _log(f"{CLASSES * per_class} synthetic {size}px images -> {url}")
        return url

    def overrides(self, run: str, *extra: str) -> list[str]:
        base = [f"run.url={self.work / run}", f"data.train_url={self.shards}", "data.eval_url=",
                f"model.num_classes={CLASSES}", f"schedule.steps={self.steps}", "schedule.warmup_steps=2",
                f"checkpoint.every_steps={self.steps // 2}", "checkpoint.keep_last=4", "launch.num_workers=1",
                f"launch.use_gpu={'true' if self.cuda else 'false'}", "logging.every_steps=5",
                "logging.image_grid=false"]
        if self.dry:
            base += ["model.name=convnext_atto", "data.image_size=32", "data.micro_batch_size=8",
                     "schedule.global_batch_size=8", "data.num_workers=1", "logging.every_steps=2",
                     "launch.cpus_per_worker=2"]
        else:
            cores = max(1, (os.cpu_count() or 2) - 2)
            base += ["schedule.global_batch_size=32", "data.micro_batch_size=32", f"data.num_workers={cores}",
                     f"launch.cpus_per_worker={cores}", "logging.measure_peak=true"]
        return base + list(extra)

    def train(self, name: str, *extra: str, timeout_s: float = 900) -> dict:
        """`pretrain train --launcher torchrun` with the recipe and `extra` overrides; its run summary."""
        args = [sys.executable, "-m", "launch.cli", "train", "--config", str(RECIPE), "--launcher", "torchrun"]
        for item in self.overrides(name, *extra):
            args += ["--set", item]
        t0 = time.monotonic()
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        (self.work / f"{name}.log").write_text(proc.stdout + proc.stderr)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
        summary = json.loads(lines[-1][len("SUMMARY "):]) if lines else {}
        summary.update(exit_code=proc.returncode, seconds=round(time.monotonic() - t0, 1))
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
            summary["error"] = summary.get("error") or " | ".join(tail)[-600:]
        self.runs[name] = summary
        _log(f"{name}: exit {proc.returncode} in {summary['seconds']:.0f}s "
             f"{json.dumps(summary.get('perf', {}))[:300]}")
        return summary

    def row(self, name: str, value, unit: str = "", detail: str = "", ok: bool | None = None) -> None:
        self.rows.append({"check": name, "value": value, "unit": unit, "detail": detail,
                          "ok": ok if ok is not None else value not in (None, "failed")})

    # --------------------------------------------------------------------------------------- checks

    def run(self) -> Path:
        self.shards = self.data()
        eager = self.train("eager")
        self._perf_rows("eager", eager)
        self._resume(eager)
        compiled = self.train("compiled", "model.compile=true")
        self._perf_rows("compiled", compiled)
        if eager.get("perf", {}).get("images_per_s") and compiled.get("perf", {}).get("images_per_s"):
            self.row("compile speed-up (images/s compiled / eager)",
                     round(compiled["perf"]["images_per_s"] / eager["perf"]["images_per_s"], 3))
        if self.cuda:
            fp16 = self.train("fp16", "precision.dtype=fp16", f"schedule.steps={min(20, self.steps)}")
            self.row("fp16 path (20 steps, dynamic loss scaling)", "ok" if fp16["exit_code"] == 0 else "failed",
                     detail=fp16.get("error", f"loss {fp16.get('loss_first')} -> {fp16.get('loss_last')}"))
        else:
            self.row("fp16 path", "skipped", detail="DeepSpeed runs fp16 only on CUDA", ok=True)
        self._optimizers()
        self._suite_rows()
        return self.write()

    def _perf_rows(self, name: str, summary: dict) -> None:
        perf = summary.get("perf") or {}
        if summary.get("exit_code") != 0:
            self.row(f"{name} run", "failed", detail=summary.get("error", ""))
            return
        self.row(f"{name}: images/s per GPU", _round(perf.get("images_per_s_per_worker")), "img/s")
        self.row(f"{name}: step time", _round(perf.get("step_s"), 4), "s")
        self.row(f"{name}: MFU (vs measured bf16 matmul peak)", _round(perf.get("mfu"), 4), "",
                 ok=True if not self.cuda else None)
        self.row(f"{name}: peak memory per rank", _round((perf.get("max_bytes") or 0) / 2**30, 2), "GiB")
        self.row(f"{name}: data wait per step (host timer)", _round(perf.get("data_wait_s"), 4), "s")
        self.row(f"{name}: input stall per step (CUDA events)", _round(perf.get("input_stall_s"), 4), "s",
                 ok=True if not self.cuda else None)

    def _resume(self, eager: dict) -> None:
        import torch

        from reliability.harness import copy_checkpoint, final_state

        if eager.get("exit_code") != 0:
            self.row("resume", "failed", detail="the eager run failed")
            return
        src, dst = str(self.work / "eager"), str(self.work / "resumed")
        copy_checkpoint(src, dst, f"step_{self.steps // 2}")
        resumed = self.train("resumed")
        if resumed.get("exit_code") != 0 or resumed.get("resumed_from") != self.steps // 2:
            self.row("resume from the mid-run checkpoint", "failed", detail=resumed.get("error", str(resumed)[:300]))
            return
        a, b = final_state(src), final_state(dst)
        diff = max((a[k][n] - b[k][n]).abs().max().item() for k in ("master", "ema") for n in a[k])
        scale = max(a["master"][n].abs().max().item() for n in a["master"])
        bitwise = all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])
        tolerance = 0.0 if not self.cuda else 5e-2 * scale  # GPU kernels are not bitwise deterministic
        self.row("resume: max |resumed - uninterrupted| (master, EMA)", f"{diff:.3e}",
                 detail=f"bitwise equal: {bitwise}; largest weight {scale:.3g}", ok=diff <= tolerance)

    def _optimizers(self) -> None:
        choices = ["torch", "torch_fused"] + ([] if self.dry else ["deepspeed_fused"])
        steps = f"schedule.steps={min(10, self.steps)}"
        for impl in choices:
            result = self.train(f"optim-{impl}", f"optim.implementation={impl}", steps, "checkpoint.every_steps=1000")
            perf = result.get("perf") or {}
            value = _round(perf.get("step_s"), 4) if result["exit_code"] == 0 else "failed"
            self.row(f"optimizer {impl}: step time", value, "s", detail=result.get("error", ""),
                     ok=True if impl == "deepspeed_fused" else None)
        if self.dry:
            self.row("optimizer deepspeed_fused", "skipped", detail="JIT-compiles C++ on CPU", ok=True)

    def _suite_rows(self) -> None:
        only = "mfu" if self.dry else "model_step,mfu"
        out = self.work / "suite"
        cmd = [sys.executable, "-m", "benchmarks", "--quick", "--only", only, "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        results = sorted(out.glob("*.json"))
        if proc.returncode != 0 or not results:
            self.row("benchmark suite GPU rows", "failed", detail=(proc.stderr or proc.stdout)[-500:])
            return
        for r in json.loads(results[-1].read_text()).get("rows", []):
            if r.get("id", "").startswith(("model/cuda", "mfu/")):
                value = r.get("ratio") if r.get("kind") == "ratio" else r.get("value")
                self.row(f"suite {r['id']}", None if value is None else round(value, 4), r.get("unit", ""),
                         detail=f"{r.get('status', '')} {r.get('context', '')}"[:300], ok=True)

    # --------------------------------------------------------------------------------------- output

    def write(self) -> Path:
        import torch

        tag = "dryrun-cpu" if self.dry else re.sub(r"[^a-z0-9]+", "-", self.device.lower()).strip("-")
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        base = out / f"{tag}-{time.strftime('%Y-%m-%d')}"
        meta = {"device": self.device, "dry_run": self.dry, "steps": self.steps, "torch": torch.__version__,
                "cuda": torch.version.cuda, "seconds": round(time.monotonic() - self.started, 1),
                "recipe": str(RECIPE.relative_to(ROOT)), "classes": CLASSES}
        base.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": self.rows, "runs": self.runs},
                                                        indent=1))
        lines = [f"# GPU check: {self.device}{' (dry run on CPU)' if self.dry else ''}, {time.strftime('%Y-%m-%d')}",
                 "", f"{meta['seconds'] / 60:.1f} min; torch {meta['torch']} (CUDA {meta['cuda']}); "
                 f"{self.steps} steps of {'convnext_atto 32 px' if self.dry else 'convnext_xlarge 224 px'} "
                 f"(the 22k recipe, {CLASSES} synthetic classes). Every value is measured in this run.", "",
                 "| check | value | unit | | detail |", "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['check']} | {r['value']} | {r['unit']} | {'ok' if r['ok'] else '**FAILED**'} | "
                         f"{str(r['detail']).replace('|', '/')} |")
        base.with_suffix(".md").write_text("\n".join(lines) + "\n")
        return base.with_suffix(".json")


def _round(value, digits: int = 1):
    return None if value is None else round(float(value), digits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same code path on CPU, tiny and fast")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--steps", type=int, default=0, help="training steps per run (default 50; dry run 6)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, runs)")
    args = parser.parse_args(argv)
    check = Check(args)
    try:
        path = check.run()
    finally:
        if not args.keep:
            shutil.rmtree(check.work, ignore_errors=True)
    failed = [r["check"] for r in check.rows if not r["ok"]]
    print(path.with_suffix(".md").read_text())
    _log(f"results: {path} ({len(failed)} failed{': ' + ', '.join(failed) if failed else ''})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

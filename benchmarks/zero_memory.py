"""ZeRO memory: model-state bytes each rank really holds ÷ the ZeRO paper's formula, stages 1/2/3, N ranks.

Theory (Rajbhandari et al. 2020, mixed precision with Adam, Ψ parameters, N data-parallel ranks),
bytes per rank: 2Ψ bf16 parameters (÷N at stage 3) + 2Ψ bf16 gradients (÷N at stages 2 and 3)
+ 12Ψ/N optimizer states (fp32 master weights, Adam's exp_avg and exp_avg_sq).

Measured: N real processes over gloo on CPU (``RANK``/``WORLD_SIZE``/``MASTER_*`` as torchrun sets
them, one thread each), each building the worker's engine with ``Trainer._build_engine`` (DeepSpeed,
bf16, ``torch.optim.AdamW``; ``convnext_atto``, 10 classes; EMA off, as it is not in the formula: it
adds 4Ψ/N), taking one optimizer step, then the forward and backward of a second one. At that point
(gradients held, before ``engine.step()``: the peak of the model states) every tensor reachable from
the engine — module parameters, their ``.grad`` and DeepSpeed's attributes on them, every tensor in
the ZeRO optimizer's attributes, lists and dicts, the inner Adam's state — is collected,
deduplicated by storage, and its bytes are summed.

* Not counted: the gradient-reduction buckets (``ipg_buckets``: ``zero.reduce_bucket_size``
  elements whatever Ψ is; communication buffers, not model states; ZeRO-1/2 free them at the end of
  backward, ZeRO-3 keeps them; in ``detail``) and zero-size placeholders.
* Counted beyond the formula: alignment padding of the flat buffers, Adam's ``step`` scalars, the
  0-d grad-norm and overflow tensors.
* ZeRO-3 runs with ``stage3_param_persistence_threshold = 0``. With the recipe's 1e5 every parameter
  smaller than that stays whole on every rank: 9 % of convnext_atto's parameters (0.5 % of
  ConvNeXt-XL's), so the formula would not apply to the small model.

Why the ratio is not 1 everywhere (DeepSpeed 0.19.8): at ZeRO-1 without gradient accumulation (the
recipe's case) gradients are reduced in buckets during backward and a rank keeps only those of the
parameters overlapping its partition, as at ZeRO-2, so it holds far less than 2Ψ; at ZeRO-1/2 that
kept gradient is the *whole* gradient of each overlapping parameter, so a rank whose partition
boundary cuts a large tensor holds more than 2Ψ/N. Per-term ratios are in the context, bytes by
term in ``detail``.

Not timings: ratio = measured ÷ theory, one measurement per rank; the row carries the rank holding
the most (the one that runs out of memory first); every rank's ratio is in the context.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from benchmarks.harness import MEASURED, Context, Goal, Row, fmt_bytes, launch_ranks

NAME = "zero_memory"
MODEL, CLASSES, MICRO, PX = "convnext_atto", 10, 4, 32
STAGES = (1, 2, 3)
WORLD_SIZES = (1, 2, 4)
QUICK_WORLD_SIZES = (1, 2)
TERMS = ("params", "grads", "fp32_master", "adam")
BUCKETS = ("ipg_buckets",)
"""ZeRO optimizer attributes holding communication buffers (sized by config, not by Ψ): not counted."""
FORMULA = {1: "2Ψ + 2Ψ + 12Ψ/N", 2: "2Ψ + 2Ψ/N + 12Ψ/N", 3: "2Ψ/N + 2Ψ/N + 12Ψ/N"}


def plan(ctx: Context) -> list[Row]:
    rows = []
    for n in WORLD_SIZES:
        for stage in STAGES:
            row = Row(f"zero/stage{stage}-n{n}", NAME,
                      f"model-state bytes per rank, ZeRO-{stage}, {n} rank{'s' * (n > 1)} (gloo), {MODEL} bf16 + AdamW",
                      Goal("~", 1.0, 0.10), sides=f"measured ÷ theory ({FORMULA[stage]})")
            if ctx.quick and n not in QUICK_WORLD_SIZES:
                row.status = "not run (quick)"
            rows.append(row)
    return rows


def theory(psi: int, stage: int, n: int) -> dict[str, float]:
    """Bytes per rank by term, as the ZeRO paper counts them."""
    return {"params": 2 * psi / (n if stage == 3 else 1), "grads": 2 * psi / (n if stage >= 2 else 1),
            "fp32_master": 4 * psi / n, "adam": 8 * psi / n}


# ----------------------------------------------------------------------------------------- worker side


ROLES = {
    "params": ("bit16_groups_flat", "fp16_partitioned_groups_flat"),
    "grads": ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer"),
    "fp32_master": ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"),
    "buffers": BUCKETS,
}
"""ZeRO optimizer attributes (stage 1/2 and stage 3 names) by the theory term their tensors belong to."""


def _reachable(root: Any, out: list, seen: set[int], depth: int = 0) -> None:
    """Every tensor reachable from `root` through DeepSpeed/torch.optim objects, lists and dicts."""
    import torch

    if depth > 8 or id(root) in seen:
        return
    seen.add(id(root))
    if isinstance(root, torch.Tensor):
        out.append(root)
        if root.grad is not None:
            out.append(root.grad)
        for v in vars(root).values():  # what DeepSpeed hangs on a parameter (ds_tensor, grad_accum, ...)
            _reachable(v, out, seen, depth + 1)
        return
    if isinstance(root, dict):
        for k, v in root.items():
            _reachable(k, out, seen, depth + 1)
            _reachable(v, out, seen, depth + 1)
    elif isinstance(root, (list, tuple, set)):
        for v in root:
            _reachable(v, out, seen, depth + 1)
    elif isinstance(root, torch.nn.Module):
        for v in (*root.parameters(), *root.buffers()):
            _reachable(v, out, seen, depth + 1)
    elif hasattr(root, "__dict__") and type(root).__module__.startswith(("deepspeed", "torch.optim")):
        for v in vars(root).values():
            _reachable(v, out, seen, depth + 1)


def count_model_states(engine) -> dict[str, int]:
    """Bytes by term of every distinct storage reachable from the engine (see the module docstring).

    The known holders are visited first, each under its term; whatever else the walk of the ZeRO
    optimizer finds is 'other' (counted too). A storage is counted once, under the first term found.
    """
    zero_opt = engine.optimizer
    module_params = list(engine.module.parameters())
    sources: list[tuple[str, Any]] = [
        ("params", [p.data for p in module_params]),  # stage 3: empty placeholders outside forward/backward
        ("grads", [p.grad for p in module_params if p.grad is not None]),
    ]
    for term, attrs in ROLES.items():
        sources += [(term, getattr(zero_opt, a)) for a in attrs if hasattr(zero_opt, a)]
    sources += [("adam", [v for st in zero_opt.optimizer.state.values() for v in st.values()]),
                ("other", zero_opt), ("other", engine.module)]
    seen: set[int] = set()
    counted: set[int] = set()
    by_term = {t: 0 for t in (*TERMS, "buffers", "other")}
    for term, root in sources:
        found: list = []
        _reachable(root, found, seen)
        for tensor in found:
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in counted:
                continue
            counted.add(storage.data_ptr())
            by_term[term] += storage.nbytes()
    return by_term


def worker(out_dir: str, model: str, stages: list[int]) -> None:
    """One rank: for each stage build the engine, step, backward once more, count, write JSON."""
    import gc

    from benchmarks.engine_overhead import build_trainer, config, fixed_batch
    from pretrain.engine.distributed import destroy, init_distributed
    from pretrain.metrics import StepTimes

    dist_ctx = init_distributed(300.0)
    n = dist_ctx.world_size
    results = []
    for stage in stages:
        cfg = config(os.path.join(out_dir, f"run-{stage}"), f"model.name={model}", f"model.num_classes={CLASSES}",
                     "ema.enabled=false", f"zero.stage={stage}", "zero.stage3_param_persistence_threshold=0",
                     px=PX, micro=MICRO, ranks=n)
        trainer = build_trainer(cfg, dist_ctx)
        engine = trainer.engine
        psi = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        batch = fixed_batch(cfg, dist_ctx.rank)
        trainer.train_step(iter([batch]), StepTimes())  # optimizer states exist from here on
        x, target = trainer.data.task.inputs(batch, dist_ctx.device, trainer.dtype, 0)
        engine.backward(trainer.data.task.loss(engine(x), target))
        counts = count_model_states(engine)
        engine.step()
        results.append({"stage": stage, "rank": dist_ctx.rank, "world_size": n, "psi": psi, "bytes": counts})
        trainer.close()
        del trainer, engine
        gc.collect()
    with open(os.path.join(out_dir, f"rank{dist_ctx.rank}.json"), "w") as f:
        json.dump(results, f)
    destroy()


# ----------------------------------------------------------------------------------------- driver side


def launch(ctx: Context, n: int, stages: tuple[int, ...], timeout_s: float = 600.0) -> list[list[dict]]:
    """Run `n` worker processes (one gloo group) over all `stages`; each rank's results."""
    out_dir = launch_ranks(ctx, n, "benchmarks.zero_memory", ["--model", MODEL, "--stages", ",".join(map(str, stages))],
                           f"zero-n{n}", timeout_s)
    results = []
    for rank in range(n):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


def run(ctx: Context, rows: dict[str, Row]) -> None:
    sizes = QUICK_WORLD_SIZES if ctx.quick else WORLD_SIZES
    for n in sizes:
        t0 = time.perf_counter()
        per_rank = launch(ctx, n, STAGES)
        for i, stage in enumerate(STAGES):
            ranks = [r[i] for r in per_rank]
            psi = ranks[0]["psi"]
            th = theory(psi, stage, n)
            total_th = sum(th.values())
            measured = [sum(r["bytes"][t] for t in (*TERMS, "other")) for r in ranks]
            worst = max(range(n), key=lambda r: measured[r])
            b = ranks[worst]["bytes"]
            row = rows[f"zero/stage{stage}-n{n}"]
            row.ratio = measured[worst] / total_th
            row.reps, row.status = 1, MEASURED
            row.context = (f"rank {worst} (largest) {fmt_bytes(measured[worst])} vs theory {fmt_bytes(total_th)}, "
                           f"Ψ = {psi:,}; by term " + ", ".join(f"{t} {b[t] / th[t]:.3f}" for t in TERMS)
                           + (f"; ranks {', '.join(f'{m / total_th:.3f}' for m in measured)}" if n > 1 else ""))
            row.detail = {"psi": psi, "theory_bytes": th, "measured_bytes_per_rank": [r["bytes"] for r in ranks],
                          "measured_total_per_rank": measured, "model": MODEL, "backend": "gloo"}
            ctx.log(f"    ZeRO-{stage} N={n}: measured {fmt_bytes(measured[worst])} / theory {fmt_bytes(total_th)} "
                    f"= {row.ratio:.3f}  ({', '.join(f'{t} {fmt_bytes(v)}' for t, v in b.items())})")
        ctx.log(f"    N={n}: {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="ZeRO memory benchmark worker (one rank; started by run())")
    parser.add_argument("--worker", required=True, help="output directory")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--stages", default="1,2,3")
    args = parser.parse_args()
    worker(args.worker, args.model, [int(s) for s in args.stages.split(",")])

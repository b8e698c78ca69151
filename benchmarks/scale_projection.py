"""Scale projection: step time, images/s and GPU-hours of the XL 22k recipe on 16 nodes × 8 GPUs.

Arithmetic, not a measurement (every row says so in its status):

* recipe: ``configs/convnext_xlarge_in22k.toml`` (global batch, micro-batch, workers, epochs, ZeRO
  stage) and fall11's 14,197,122 images (docs/cluster-guide.md) through ``pretrain.optim.step_plan``:
  311,940 steps;
* Ψ: ``convnext_xlarge`` with 21,841 classes built on the meta device (392.9M);
* compute per step: micro-batch × accumulation ÷ one GPU's training images/s; that rate is the one
  the MFU benchmark measured in this run (status "projection") or, without a GPU, timm's published
  RTX 3090 AMP figure of 116 img/s (status "anchor"; not scaled to the A100 the network assumptions
  describe; docs/cluster-guide.md assumes an A100 at 2–2.5×);
* communication per step: :func:`zero_comm_bytes_per_gpu` (below), with the recipe's accumulation G
  and ``zero.communication_dtype`` (fp32 unless the config says otherwise). DeepSpeed 0.19.8's
  ZeRO-1/2 never reduce-scatters: every gradient bucket is one full ``all_reduce``
  (``use_multi_rank_bucket_allreduce``), after which each rank keeps its own slice; the bf16 weights
  are then all-gathered once per step. The figure is the bytes each GPU sends, at the bus bandwidth of
  the slowest hop. Assumed p4d-like nodes: 8 A100 on NVLink (≈ 200 GB/s achieved bus bandwidth) and
  4 × 100 Gb/s EFA (50 GB/s per node at line rate). A ring or the hierarchical schedule across nodes
  pushes about that volume through each node's NICs, so the inter-node 50 GB/s bounds it;
* the figure is the worst case (no overlap of communication with backward: step = compute + comm);
  the fully overlapped best case (step = max(compute, comm)) is in the context.

Not included: data-loader stalls, checkpoint stalls, restarts, NCCL efficiency below line rate.
"""

from __future__ import annotations

import os

from benchmarks.harness import ANCHOR, CONTEXT, PROJECTION, Context, Row, fmt_s

NAME = "scale_projection"
RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "convnext_xlarge_in22k.toml")
IN22K_IMAGES = 14_197_122
"""fall11 (``fall11_whole.tar``, the paper's data): docs/cluster-guide.md."""
NODES, GPUS_PER_NODE = 16, 8
NVLINK_BUS_GB_S = 200.0
"""Achieved intra-node bus bandwidth assumed for 8 A100 on NVSwitch."""
EFA_BUS_GB_S = 4 * 100 / 8
"""Inter-node bus bandwidth per node: 4 × 100 Gb/s EFA at line rate, in GB/s."""
COMM_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes per gradient element on the wire for each ``zero.communication_dtype``."""
XL_ACCUM = 1
"""The XL recipe's gradient accumulation: 4096 = 128 workers × micro-batch 32 × 1."""
XL_COMM_DTYPE = "fp32"
"""The recipes' gradient reduction dtype (``zero.communication_dtype = "fp32"``)."""
PARAM_BYTES = 2
"""bf16 weights (``precision.dtype``): what the ZeRO-1/2 all-gather moves, whatever the reduction dtype."""


def zero_comm_bytes_per_gpu(params: int, world: int, stage: int = 2, accum: int = XL_ACCUM,
                            comm_bytes: int = COMM_DTYPE_BYTES[XL_COMM_DTYPE],
                            param_bytes: int = PARAM_BYTES) -> dict[str, float]:
    """Bytes one GPU sends per optimizer step under DeepSpeed 0.19.8 ZeRO-1/2 (ring model). Pure.

    ``bytes = R·2·(N−1)/N·c·Ψ + (N−1)/N·p·Ψ`` with R = G for ZeRO-2 (it reduces after every
    micro-batch) and R = 1 for ZeRO-1 (once, at the accumulation boundary), c = bytes per element of
    the gradient all-reduce (2 bf16, 4 fp32), p = 2 (the bf16 weights all-gathered after the step).
    Derivation: a ring all-reduce is a reduce-scatter plus an all-gather, each sending (N−1)/N of the
    buffer, and DeepSpeed all-reduces every bucket in full (``use_multi_rank_bucket_allreduce``, no
    reduce-scatter) before each rank keeps its own slice; the step then all-gathers the updated bf16
    partitions once (``all_gather_into_tensor``). In bf16 that is (2·G+1)·(N−1)/N·2Ψ for ZeRO-2 and
    3·(N−1)/N·2Ψ for ZeRO-1; fp32 reduction doubles the all-reduce part: (4·G+1)·(N−1)/N·2Ψ and
    5·(N−1)/N·2Ψ. XL (Ψ = 392.9M, N = 128, G = 1): 2.34 GB in bf16, 3.90 GB in fp32.

    Returns ``allreduce``, ``allgather`` and ``total`` bytes, and ``reductions`` (R) per step.
    """
    if stage not in (1, 2):
        raise ValueError(f"ZeRO stage {stage}: only stages 1 and 2 are modelled")
    if params < 0 or world < 1 or accum < 1 or comm_bytes < 1 or param_bytes < 1:
        raise ValueError(f"invalid arguments: params={params} world={world} accum={accum} "
                         f"comm_bytes={comm_bytes} param_bytes={param_bytes}")
    ring = (world - 1) / world
    reductions = accum if stage == 2 else 1
    allreduce = reductions * 2 * ring * comm_bytes * params
    allgather = ring * param_bytes * params
    return {"allreduce": allreduce, "allgather": allgather, "total": allreduce + allgather,
            "reductions": reductions}


def comm_dtype_bytes(dtype: str) -> int:
    """Wire bytes per gradient element of a communication dtype name ("bf16", "fp16", "fp32")."""
    try:
        return COMM_DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"communication dtype {dtype!r}: expected one of "
                         f"{sorted(COMM_DTYPE_BYTES)}") from None


def recipe_comm_dtype(cfg) -> str:
    """The config's ``zero.communication_dtype``; the recipes' fp32 where the key does not exist.

    None / "auto" mean DeepSpeed's default, which is the model dtype (``precision.dtype``)."""
    dtype = getattr(cfg.zero, "communication_dtype", XL_COMM_DTYPE)
    if dtype in (None, "", "auto"):
        dtype = cfg.precision.dtype
    return dtype


def plan(ctx: Context) -> list[Row]:
    cluster = f"{NODES}×{GPUS_PER_NODE} GPUs"
    return [
        Row("scale/xl22k-step-s", NAME, f"XL 22k step time on {cluster} (compute + ZeRO-2 comm, no overlap)",
            CONTEXT, kind="value", unit="s"),
        Row("scale/xl22k-img-s", NAME, f"XL 22k training images/s of the cluster ({cluster})", CONTEXT,
            kind="value", unit="img/s"),
        Row("scale/xl22k-gpu-hours", NAME, f"GPU-hours for the whole XL 22k recipe (90 epochs, {cluster})", CONTEXT,
            kind="value", unit="GPU-h"),
    ]


def xl_params() -> int:
    import torch

    from pretrain.models import create_model

    with torch.device("meta"):
        model = create_model("convnext_xlarge", num_classes=21841)
    return sum(p.numel() for p in model.parameters())


def run(ctx: Context, rows: dict[str, Row]) -> None:
    from benchmarks.mfu import ANCHOR_IMG_S  # imports torch; kept out of the pure formula's import path
    from pretrain.config import grad_accum_steps, load_config
    from pretrain.optim import step_plan

    cfg = load_config(RECIPE)
    n = NODES * GPUS_PER_NODE
    if cfg.launch.num_workers != n or cfg.zero.stage != 2:
        raise RuntimeError(f"{RECIPE}: expected {n} workers at ZeRO-2, found {cfg.launch.num_workers} at "
                           f"ZeRO-{cfg.zero.stage}; update this projection")
    accum = grad_accum_steps(cfg.schedule, cfg.data, n)
    steps = step_plan(cfg.schedule, IN22K_IMAGES).total_steps
    psi = xl_params()
    gpu_img_s = ctx.shared.get("gpu_img_s")
    status, source = ((PROJECTION, f"{gpu_img_s:.0f} img/s per GPU measured in this run (MFU row)") if gpu_img_s
                      else (ANCHOR, f"anchor {ANCHOR_IMG_S:.0f} img/s per GPU (timm, RTX 3090 AMP; not measured here)"))
    img_s_gpu = gpu_img_s or ANCHOR_IMG_S
    compute_s = cfg.data.micro_batch_size * accum / img_s_gpu
    comm_dtype = recipe_comm_dtype(cfg)
    comm = zero_comm_bytes_per_gpu(psi, n, cfg.zero.stage, accum, comm_dtype_bytes(comm_dtype),
                                   comm_dtype_bytes(cfg.precision.dtype))
    comm_bytes = comm["total"]
    bus_gb_s = min(NVLINK_BUS_GB_S, EFA_BUS_GB_S)
    comm_s = comm_bytes / (bus_gb_s * 1e9)
    worst, best = compute_s + comm_s, max(compute_s, comm_s)
    batch = cfg.schedule.global_batch_size
    figures = {"step": (worst, best), "img_s": (batch / worst, batch / best),
               "gpu_h": (steps * worst * n / 3600, steps * best * n / 3600)}
    basis = (f"{source}; comm {comm_bytes / 1e9:.2f} GB/GPU/step ({comm['reductions']} × {comm_dtype} "
             f"all-reduce {comm['allreduce'] / 1e9:.2f} GB + {cfg.precision.dtype} weight all-gather "
             f"{comm['allgather'] / 1e9:.2f} GB) at {bus_gb_s:.0f} GB/s = {fmt_s(comm_s)}, "
             f"compute {fmt_s(compute_s)}")
    step_row, img_row, hours_row = rows["scale/xl22k-step-s"], rows["scale/xl22k-img-s"], rows["scale/xl22k-gpu-hours"]
    step_row.value = worst
    step_row.context = f"overlapped best case {fmt_s(best)}; {basis}"
    img_row.value = figures["img_s"][0]
    img_row.context = (f"best case {figures['img_s'][1]:,.0f}; global batch {batch} = {cfg.data.micro_batch_size} × "
                       f"accumulation {accum} × {n} GPUs")
    hours_row.value = figures["gpu_h"][0]
    hours_row.context = (f"best case {figures['gpu_h'][1]:,.0f}; {steps:,} steps ({cfg.schedule.epochs:g} epochs of "
                         f"{IN22K_IMAGES:,} images), wall {steps * worst / 3600:.1f} h")
    detail = {"psi": psi, "gpus": n, "accum": accum, "steps": steps, "gpu_img_s": img_s_gpu,
              "gpu_img_s_source": "measured" if gpu_img_s else "anchor", "compute_s": compute_s,
              "comm_bytes_per_gpu": comm_bytes, "comm_dtype": comm_dtype, "comm_allreduce_bytes": comm["allreduce"],
              "comm_allgather_bytes": comm["allgather"], "bus_gb_s": bus_gb_s, "comm_s": comm_s,
              "no_overlap": {k: v[0] for k, v in figures.items()}, "full_overlap": {k: v[1] for k, v in figures.items()}}
    for row in (step_row, img_row, hours_row):
        row.status, row.detail = status, detail
    data_rate = ctx.shared.get("data_img_s_per_core")
    if data_rate:
        per_gpu = data_rate * cfg.launch.cpus_per_worker
        img_row.context += (f"; input pipeline {cfg.launch.cpus_per_worker} cores × {data_rate:.0f} img/s = "
                            f"{per_gpu:.0f} img/s per GPU {'≥' if per_gpu >= img_s_gpu else '<'} {img_s_gpu:.0f} needed")
    ctx.shared.setdefault("notes", []).append(
        f"Scale projection assumptions: {NODES} nodes × {GPUS_PER_NODE} A100 (p4d-like), NVLink ≈ "
        f"{NVLINK_BUS_GB_S:.0f} GB/s intra-node, 4 × 100 Gb/s EFA ≈ {EFA_BUS_GB_S:.0f} GB/s inter-node bus bandwidth at "
        f"line rate (the bound for ring and hierarchical collectives); DeepSpeed ZeRO-2 all-reduces every "
        f"gradient bucket after each of the G = {accum} micro-batches in {comm_dtype} "
        f"(c = {comm_dtype_bytes(comm_dtype)} B/element) and all-gathers the {cfg.precision.dtype} weights "
        f"(p = {comm_dtype_bytes(cfg.precision.dtype)} B) once: G·2·(N−1)/N·cΨ + (N−1)/N·pΨ = "
        f"{comm_bytes / 1e9:.2f} GB per GPU per step (Ψ = {psi / 1e6:.1f}M, N = {n}); headline = no overlap of communication with compute (worst case), context = full "
        f"overlap (best case); compute from {source}; data, checkpoint and restart stalls not included.")
    ctx.log(f"    step {fmt_s(worst)} (best {fmt_s(best)}), {figures['img_s'][0]:,.0f} img/s, "
            f"{figures['gpu_h'][0]:,.0f} GPU-h ({status})")

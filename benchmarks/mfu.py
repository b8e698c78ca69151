"""MFU on GPU: ConvNeXt-XL (21,841 classes) train step at 224 px in bf16, on one CUDA device.

MFU = achieved model FLOP/s ÷ the bf16 matmul peak *measured in the same run*:

* achieved = 3 × ``pretrain.models.flops.flops_per_image`` (forward 2×MACs; backward counted as 2×
  forward, activation recomputation not credited) × images per second of our train step
  (``torch.autocast`` bf16, channels_last, fused AdamW, the recipe's micro-batch of 32);
* peak = a large bf16 matmul (8192³, FLOPs 2·n³) timed the same way.

The two are alternated (matmul burst, train step, matmul burst, ...), and MFU is taken per pair, so a
clock or thermal drift hits both. Images/s per GPU is compared with the published anchor: timm's
RTX 3090 AMP training benchmark of convnext_xlarge, 116 img/s. Without CUDA every row says
"not measured (no GPU)"; nothing is estimated.
"""

from __future__ import annotations

import time

import torch

from benchmarks.harness import CONTEXT, NO_GPU, Context, Goal, PairStats, Row, fmt_s

NAME = "mfu"
ANCHOR_IMG_S = 116.0
"""timm's published RTX 3090 AMP training throughput of convnext_xlarge (img/s); an anchor, not ours."""
MODEL, SIZE, BATCH, CLASSES = "convnext_xlarge", 224, 32, 21841


def plan(ctx: Context) -> list[Row]:
    rows = [
        Row("mfu/xl-224-bf16", NAME, f"MFU: {MODEL} {SIZE}px bf16 train step (micro-batch {BATCH}), best of "
            "eager / torch.compile", Goal(">=", 0.40), sides="achieved FLOP/s ÷ measured matmul peak", unit="%"),
        Row("mfu/xl-224-img-s", NAME, f"images/s per GPU, {MODEL} {SIZE}px bf16 train step", CONTEXT,
            kind="value", unit="img/s", sides=f"vs anchor {ANCHOR_IMG_S:.0f} img/s (timm, RTX 3090 AMP)"),
        Row("mfu/matmul-peak", NAME, "bf16 matmul peak measured here (8192³)", CONTEXT, kind="value",
            unit="TFLOP/s"),
    ]
    if not ctx.has_cuda:
        for row in rows:
            row.status = NO_GPU
    return rows


def _matmul_burst(n: int = 8192, iters: int = 20):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)

    def run() -> None:
        for _ in range(iters):
            torch.mm(a, b)

    return run, 2.0 * n ** 3 * iters


def _cuda_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run(ctx: Context, rows: dict[str, Row]) -> None:
    if not ctx.has_cuda:
        return
    import torch.nn.functional as F

    from pretrain.models import create_model
    from pretrain.models.flops import flops_per_image
    from pretrain.optim import param_groups

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    reps = 5 if ctx.quick else 7
    burst, burst_flops = _matmul_burst()
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=CLASSES).cuda().to(memory_format=torch.channels_last).train()
    train_flops = 3 * flops_per_image(model, SIZE) * BATCH
    x = torch.randn(BATCH, 3, SIZE, SIZE, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (BATCH,), device="cuda")
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=True)
    results = {}
    for mode in ("eager", "compile"):
        fwd = torch.compile(model) if mode == "compile" else model

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            for _ in range(3):
                _cuda_time(step)
                _cuda_time(burst)
            peak_s, step_s = [], []
            for _ in range(reps):
                peak_s.append(_cuda_time(burst))
                step_s.append(_cuda_time(step))
        except Exception as exc:  # e.g. compile unavailable: keep the eager figure
            ctx.shared["notes"].append(f"MFU {mode}: {type(exc).__name__}: {exc}")
            continue
        # MFU per pair = (train_flops / step_s) / (burst_flops / peak_s)
        stats = PairStats([train_flops / s for s in step_s], [burst_flops / s for s in peak_s])
        results[mode] = (stats, step_s, peak_s)
    if not results:
        raise RuntimeError("neither eager nor compiled XL step ran")
    best = max(results, key=lambda m: results[m][0].ratio)
    stats, step_s, peak_s = results[best]
    row = rows["mfu/xl-224-bf16"]
    row.set_pairs(stats)
    med_step = sorted(step_s)[len(step_s) // 2]
    peak = burst_flops / sorted(peak_s)[len(peak_s) // 2]
    row.context = (f"{best}; step {fmt_s(med_step)}, {train_flops / med_step / 1e12:.0f} TFLOP/s achieved; "
                   + ", ".join(f"{m}: MFU {r[0].ratio:.1%}" for m, r in results.items()))
    row.detail = {m: {"pairs": r[0].to_json(), "step_s": r[1], "peak_s": r[2]} for m, r in results.items()}
    img_s = BATCH / med_step
    rows["mfu/xl-224-img-s"].value, rows["mfu/xl-224-img-s"].status = img_s, "measured"
    rows["mfu/xl-224-img-s"].context = f"{best}; {img_s / ANCHOR_IMG_S:.2f}× the 116 img/s anchor"
    rows["mfu/matmul-peak"].value, rows["mfu/matmul-peak"].status = peak / 1e12, "measured"
    rows["mfu/matmul-peak"].context = torch.cuda.get_device_name(0)
    ctx.shared["gpu_img_s"] = img_s

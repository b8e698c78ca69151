"""Result files: ``<out>/<machine>-<date>.json`` (everything) and ``.md`` (the table), and the console table."""

from __future__ import annotations

import json
import os
from typing import Any

from benchmarks.harness import Row

SCHEMA = "convnext-pretrain-benchmarks/1"

TITLES = {
    "model_step": "Model train step (ours ÷ timm)",
    "mfu": "MFU on GPU",
    "data_pipeline": "Data pipeline",
    "engine_overhead": "Engine overhead",
    "checkpoint_stall": "Checkpoint stall",
    "zero_memory": "ZeRO memory (measured ÷ theory)",
    "scale_projection": "Scale projection (XL 22k, 16×8 GPUs)",
}


def result_cell(row: Row) -> str:
    if not row.filled:
        return row.status
    value = row.headline
    assert value is not None
    if row.kind == "ratio":
        text = f"{value:.1%}" if row.unit == "%" else f"{value:.3f}"
    else:
        text = f"{value:,.3g} {row.unit}" if abs(value) < 1000 else f"{value:,.0f} {row.unit}"
    if row.status != "measured":
        text += f" ({row.status})"
    return text


def range_cell(row: Row) -> str:
    if not row.filled or row.ratio_min is None or row.ratio_max is None:
        return ""
    if row.unit == "%":
        return f"{row.ratio_min:.1%} – {row.ratio_max:.1%}"
    return f"{row.ratio_min:.3f} – {row.ratio_max:.3f}"


def met_cell(row: Row) -> str:
    return {True: "yes", False: "**no**", None: "–"}[row.met]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| Figure | Sides | Goal | Result (median) | min – max | n | Met | Context |",
             "|---|---|---|---|---|---|---|---|"]
    bench = None
    for row in rows:
        if row.bench != bench:
            bench = row.bench
            lines.append(f"| **{TITLES.get(bench, bench)}** | | | | | | | |")
        ctx = row.context.replace("|", "\\|")
        lines.append(f"| {row.what} | {row.sides} | {row.goal.text()} | {result_cell(row)} | {range_cell(row)} | "
                     f"{row.reps or ''} | {met_cell(row)} | {ctx} |")
    return "\n".join(lines)


def console_table(rows: list[Row], width: int = 160) -> str:
    out = []
    bench = None
    for row in rows:
        if row.bench != bench:
            bench = row.bench
            out.append(f"\n== {TITLES.get(bench, bench)}")
        rng = range_cell(row)
        line = f"  {row.id:<44} goal {row.goal.text():<22} {result_cell(row):<30} {rng:<17} met {met_cell(row)}"
        out.append(line[:width])
    return "\n".join(out)


def write(out_dir: str, stem: str, meta: dict[str, Any], rows: list[Row], notes: list[str]) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, stem + ".json")
    md_path = os.path.join(out_dir, stem + ".md")
    payload = {"schema": SCHEMA, **meta, "rows": [r.to_json() for r in rows]}
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, json_path)
    m = meta["machine"]
    v = m["versions"]
    gpu = m["gpu"]["name"] if m.get("gpu") else "none"
    header = [
        f"# Benchmark results: {stem}",
        "",
        f"Command: `{meta['command']}` ({'quick' if meta['quick'] else 'full'} run, {meta['duration_s'] / 60:.1f} min, "
        f"started {meta['started']}).",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_cores_available']} cores available "
        f"(ISA: {', '.join(m['cpu_isa']) or 'n/a'}; torch CPU capability {m['torch_cpu_capability']}), "
        f"{m['memory_gib']} GiB RAM, GPU: {gpu}. torch threads {m['torch_threads']} "
        f"(interop {m['torch_interop_threads']}).",
        "",
        f"Load average (1, 5, 15 min) {', '.join(map(str, meta['load_average']['start']))} at the start, "
        f"{', '.join(map(str, meta['load_average']['end']))} at the end: other processes may have shared the "
        "machine; ratios timed in CPU seconds are the ones robust to that.",
        "",
        f"Versions: torch {v['torch']}, deepspeed {v['deepspeed']}, timm {v['timm']}, ray {v['ray']}, "
        f"torchvision {v['torchvision']}, moto {v['moto']}, python {v['python']}.",
        "",
        "Each ratio is A ÷ B of the two sides named, measured alternately (A B A B ...) in one run after "
        "warm-up; the result is the median of the per-pair ratios, with their min and max over n pairs. "
        "Absolute figures are context only. Method: docs/benchmarks.md.",
        "",
    ]
    body = [markdown_table(rows)]
    if notes:
        body += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    with open(md_path + ".tmp", "w") as f:
        f.write("\n".join(header + body) + "\n")
    os.replace(md_path + ".tmp", md_path)
    return md_path, json_path

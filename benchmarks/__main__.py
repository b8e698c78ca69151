"""``python -m benchmarks [--quick] [--only NAME[,NAME]] [--out DIR]``: run the suite, write the results.

Runs every benchmark that fits this machine (GPU rows say "not measured (no GPU)" without CUDA),
writes ``<out>/<machine>-<date>.md`` and ``.json`` and prints the table last. ``--quick`` is the
≤ 5-minute variant (fewer cases and repetitions, smaller states). ``--only`` runs the named
benchmarks; the rows of the others are still listed, as "not run (--only)". ``--reps N`` overrides
the number of timed pairs (for smoke tests; a result needs at least 5).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shlex
import shutil
import sys
import time
import traceback

from benchmarks import BENCHMARKS
from benchmarks.harness import NOT_RUN, Row, machine_info, machine_slug, make_context

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the <= 5 minute variant")
    parser.add_argument("--out", default=DEFAULT_OUT, help="result directory (default: benchmarks/results)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(BENCHMARKS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all available cores)")
    parser.add_argument("--stem", default="", help="result file name without extension "
                                                    "(default: <machine>-<date>[-quick])")
    parser.add_argument("--reps", type=int, default=0,
                        help="timed pairs, for a smoke test (default: 5 quick / 7 full; taken by "
                             "checkpoint_stall so far)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and their rows, run nothing")
    args = parser.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in BENCHMARKS]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(BENCHMARKS)}")
    if args.reps < 0:
        parser.error("--reps: must be >= 0")
    args.only = only
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now().astimezone()
    load_start = os.getloadavg()
    t0 = time.monotonic()
    ctx = make_context(args.quick, args.threads or None, log=lambda s: print(s, flush=True), reps=args.reps)
    modules = {name: importlib.import_module(f"benchmarks.{name}") for name in BENCHMARKS}
    planned: dict[str, list[Row]] = {name: mod.plan(ctx) for name, mod in modules.items()}
    if args.list:
        for name, rows in planned.items():
            print(name)
            for row in rows:
                print(f"  {row.id:<48} goal {row.goal.text():<24} {row.what}")
        return 0
    selected = args.only or list(BENCHMARKS)
    info = machine_info(ctx.threads)
    durations: dict[str, float] = {}
    errors: dict[str, str] = {}
    ctx.shared["notes"] = []
    try:
        for name in BENCHMARKS:
            rows = planned[name]
            if name not in selected:
                for row in rows:
                    if row.status == NOT_RUN:
                        row.status = "not run (--only)"
                continue
            ctx.log(f"[{time.monotonic() - t0:6.0f}s] {name}: {len(rows)} rows")
            b0 = time.monotonic()
            try:
                modules[name].run(ctx, {r.id: r for r in rows})
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not lose the others' rows
                errors[name] = traceback.format_exc()
                ctx.log(errors[name])
                for row in rows:
                    if row.status == NOT_RUN:
                        row.status = f"not measured (error: {type(exc).__name__}: {str(exc)[:120]})"
            durations[name] = round(time.monotonic() - b0, 1)
            ctx.log(f"[{time.monotonic() - t0:6.0f}s] {name}: done in {durations[name]:.0f}s")
    finally:
        # The in-process benchmarks share one process group: DeepSpeed caches groups module-wide, so a
        # group destroyed and re-created between two engines breaks the second one.
        from pretrain.engine.distributed import destroy

        destroy()
        ctx.close()
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    rows = [r for name in BENCHMARKS for r in planned[name]]
    for row in rows:  # nothing may stay "not run" silently
        if row.status == NOT_RUN:
            row.status = "not measured (skipped)"
    stem = args.stem or f"{machine_slug(info)}-{started.date().isoformat()}" + ("-quick" if args.quick else "")
    meta = {
        "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                else sys.argv[1:])),
        "quick": args.quick,
        "only": args.only,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "benchmark_durations_s": durations,
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "errors": errors,
        "machine": info,
    }
    from benchmarks.report import console_table, write

    md, js = write(args.out, stem, meta, rows, ctx.shared["notes"])
    print(f"\nwrote {md}\n      {js}")
    print(console_table(rows))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

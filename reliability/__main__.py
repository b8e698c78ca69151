"""`make chaos` / `python -m reliability`: run the chaos scenarios and write the results table.

    python -m reliability [--only storage-faults,worker-kills] [--seed N] [--list] [--keep]

Writes reliability/results/<machine>-<date>.{json,md} and the table in docs/reliability.md; exits 1
if any scenario did not give its documented outcome.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback

from reliability.harness import ROOT, Env, Row, new_workdir, render_table, write_results
from reliability.scenarios import REGISTRY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated scenario names (the clean references always run)")
    parser.add_argument("--seed", type=int, default=20261202, help="seeds the faults, kill steps and victims")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (run logs, moto log)")
    args = parser.parse_args(argv)
    if args.list:
        for name, fn in REGISTRY.items():
            print(f"{name:22s} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    chosen = [n for n in args.only.split(",") if n] or list(REGISTRY)
    unknown = sorted(set(chosen) - set(REGISTRY))
    if unknown:
        print(f"unknown scenario(s) {unknown}; valid: {list(REGISTRY)}", file=sys.stderr)
        return 2
    names = ["clean", *[n for n in chosen if n != "clean"]]
    workdir = new_workdir()
    started = time.monotonic()
    log = lambda text: print(f"[chaos {time.monotonic() - started:6.0f}s] {text}", flush=True)  # noqa: E731
    env, refs, rows = Env(workdir, args.seed, log), {}, []
    try:
        env.start()
        for name in names:
            log(f"scenario {name} ...")
            t0 = time.monotonic()
            try:
                row = REGISTRY[name](env, refs)
            except Exception as exc:  # a broken scenario is a failed row, not a lost table
                row = Row(name, "", "", outcome=f"scenario error: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            row.seconds = time.monotonic() - t0
            rows.append(row)
            log(f"  {'ok' if row.passed else 'FAILED'}: {row.outcome} (bitwise {row.bitwise}, {row.seconds:.0f}s)")
            if name == "clean" and "state" not in refs:
                log("the clean references failed; the other scenarios need them")
                break
    finally:
        env.stop()
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - started
    path = write_results(rows, seconds, args.seed, ROOT / "reliability" / "results", ROOT / "docs" / "reliability.md")
    print("\n" + render_table(rows) + "\n")
    print(f"{sum(r.passed for r in rows)}/{len(rows)} scenarios as documented in {seconds / 60:.1f} min; "
          f"results: {path.relative_to(ROOT)}, docs/reliability.md")
    return 0 if all(r.passed for r in rows) and len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The fault suite, long run: `python benches/faults.py [-r 20] [--faults sigkill,restart,...]`.

Runs tests/faults/harness.py's repetitions (the short round of tests/faults/test_faults.py runs
one of each): a private embedded PostgreSQL, two worker processes through a fault proxy and a
sender process, and per repetition one fault under load followed by the checks (lost, finished
twice, duplicate and missing replies, batch counters against a recount, messages left invisible)
and the recovery time (fault end -> throughput back at half the pre-fault rate). Faults take
turns (rep 1 of each, then rep 2...). Prints one line per repetition, then the table of the
README; `--out FILE` also writes every repetition as a JSON line. Exit code 1 when any
repetition had an error or did not recover within `--recovery-limit`.

Faults: sigkill, restart, terminate, slots, lock, freeze, latency (default: all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "faults"))
from harness import FAULTS, FaultRig, RepResult, table

DEFAULT_FAULTS = list(FAULTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-r", "--repetitions", type=int, default=20, help="per fault")
    parser.add_argument(
        "--faults",
        default=",".join(DEFAULT_FAULTS),
        help=f"comma-separated, of {','.join(FAULTS)} (default: all)",
    )
    parser.add_argument("--rate", type=int, default=200, help="commands a second sent")
    parser.add_argument("--concurrency", type=int, default=32, help="of each worker")
    parser.add_argument("--vt", type=int, default=5, help="visibility timeout, seconds")
    parser.add_argument("--hold", type=float, default=3.0, help="slots/lock/latency, seconds")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--recovery-limit", type=float, default=30.0)
    parser.add_argument("--out", type=Path, help="write every repetition as a JSON line")
    parser.add_argument("--workdir", type=Path, help="logs of the processes (default: a temp dir)")
    args = parser.parse_args()
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rcmd-faults-"))
    print(f"logs in {workdir}", flush=True)
    results: list[RepResult] = []
    t0 = time.monotonic()
    out = args.out.open("a") if args.out else None
    try:
        with FaultRig(
            workdir,
            rate=args.rate,
            concurrency=args.concurrency,
            vt=args.vt,
            hold=args.hold,
            latency_ms=args.latency_ms,
            recovery_limit=args.recovery_limit,
            log=lambda line: print(f"[{time.monotonic() - t0:7.1f}s]   {line}", flush=True),
        ) as rig:
            for rep in range(1, args.repetitions + 1):
                for fault in faults:
                    result = rig.run(fault, rep)
                    results.append(result)
                    print(f"[{time.monotonic() - t0:7.1f}s] {result.line()}", flush=True)
                    for detail in result.details:
                        print(f"    {detail}", flush=True)
                    if out is not None:
                        out.write(json.dumps(dataclasses.asdict(result)) + "\n")
                        out.flush()
    finally:
        if out is not None:
            out.close()
        if results:
            print(
                f"\n{len(results)} repetitions in {time.monotonic() - t0:.0f} s, "
                f"{sum(r.commands for r in results):,} commands\n",
                flush=True,
            )
            print(table(results, args.recovery_limit), flush=True)
    bad = [r for r in results if r.errors or r.recovery_s is None]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""The test suite's wall time on a quiet machine and beside CPU-heavy jobs, in one run.

Runs `python -m pytest -q` once alone, then once beside `--jobs` other processes that each loop
float32 matrix products on every core (what other CI jobs on the same machine look like). Each
burner stops by itself after `--limit` seconds and is also ended when the suite finishes.

    python benchmarks/busy.py [--jobs 2] [--out benchmarks/results/busy.json]
"""
from __future__ import annotations

import subprocess
import sys
import time

from common import REPO, arguments, write_results

BURN = """
import time, torch
a = torch.randn(1500, 1500)
end = time.time() + {limit}
while time.time() < end:
    a = (a @ a).tanh()
"""


def suite() -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                          capture_output=True, text=True)
    return time.perf_counter() - start, done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=1200, help="seconds after which a burner stops by itself")
    args = parser.parse_args()
    quiet_s, quiet_summary = suite()
    print(f"quiet: {quiet_s:.0f} s ({quiet_summary})", flush=True)
    burners = [subprocess.Popen([sys.executable, "-c", BURN.format(limit=args.limit)]) for _ in range(args.jobs)]
    try:
        time.sleep(3)
        busy_s, busy_summary = suite()
    finally:
        for b in burners:
            b.terminate()
            b.wait()
    print(f"beside {args.jobs} CPU-heavy jobs: {busy_s:.0f} s ({busy_summary}); {busy_s / quiet_s:.2f}x", flush=True)
    write_results(args.out, {"quiet_s": round(quiet_s, 1), "busy_s": round(busy_s, 1), "jobs": args.jobs,
                             "quiet": quiet_summary, "busy": busy_summary})


if __name__ == "__main__":
    main()

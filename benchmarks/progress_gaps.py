"""The longest silence of `oaq-search run` writing to a log (not a terminal): the quickstart from a
cold cache, each output line timestamped as it arrives.

    python benchmarks/progress_gaps.py --study studies/quickstart.toml
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time

from _common import REPOSITORY, write_results

GOAL_S = 30.0  # issue 35: a progress line at least every 30 s of work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/quickstart.toml")
    args = parser.parse_args()
    entry = shutil.which("oaq-search")
    with tempfile.TemporaryDirectory() as scratch:
        environment = {**os.environ, "OAQ_CACHE_DIR": f"{scratch}/cache"}  # cold: nothing measured before
        command = [entry, "run", args.study, "--output-dir", f"{scratch}/run"]
        started = last = time.perf_counter()
        gaps, lines = [], []
        with subprocess.Popen(command, cwd=REPOSITORY, env=environment, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as process:
            for line in process.stdout:
                now = time.perf_counter()
                gaps.append((now - last, line.strip()))
                lines.append(f"{now - started:7.1f} s  {line.rstrip()}")
                last = now
        if process.returncode:
            raise SystemExit(f"{' '.join(command)} failed with status {process.returncode}:\n" + "\n".join(lines))
    longest, after = max(gaps)
    rows = [{"study": args.study, "wall_s": last - started, "lines": len(lines), "longest_gap_s": longest,
             "line_ending_it": after}]
    verdict = "met" if longest <= GOAL_S else "missed"
    table = (f"| study | wall (s) | lines | longest silence (s) |\n|---|---:|---:|---:|\n"
             f"| `{args.study}` (cold cache) | {last - started:.0f} | {len(lines)} | {longest:.1f} |\n\n"
             f"The longest silence ended with: `{after}`. Goal: a line at least every {GOAL_S:.0f} s: {verdict}.\n\n"
             "The log, with seconds since the start:\n\n```\n" + "\n".join(lines) + "\n```")
    print(table)
    print(f"written to {write_results('progress_gaps', rows, table)}")


if __name__ == "__main__":
    main()

"""Runs jaxnet's benchmarks and writes ``benchmarks/results/<name>.json`` and ``.md``.

    python benchmarks/run.py              # full: ~5 minutes on 2 CPU cores
    python benchmarks/run.py --quick      # ~1 minute

The same workloads run from the command line with ``jaxnet bench [--quick] [--json FILE]``;
see ``benchmarks/harness.py`` for what each workload and variant is. Run it on a quiet machine: every
variant is measured side by side in one process, alternating, and reported as median, min and
max with ratios to the hand-written raw-JAX reference measured in the same run.
"""

import argparse
import datetime
import os
import pathlib
import platform

from benchmarks.harness import format_table, run_benchmarks, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="latest", help="results file name (default %(default)s)")
    args = parser.parse_args()
    results = run_benchmarks(quick=args.quick)
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "date": datetime.date.today().isoformat()}
    out = pathlib.Path(__file__).parent / "results"
    write_json(results, out / f"{args.name}.json")
    command = "python benchmarks/run.py" + (" --quick" if args.quick else "")
    (out / f"{args.name}.md").write_text(
        f"`{command}` on {results['machine']['date']}, {platform.machine()} with "
        f"{os.cpu_count()} CPU cores, jax {results['settings']['jax']}\n\n{format_table(results)}\n")
    print(format_table(results))


if __name__ == "__main__":
    main()

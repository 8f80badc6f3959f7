"""``python -m bench``: the command behind ``sluice bench`` (which names itself in the help)."""

import os

from bench.cli import bench_cli

if __name__ == "__main__":
    bench_cli(prog_name=os.environ.get("SLUICE_BENCH_PROG", "python -m bench"))

"""``python -m bench``: the same command as ``sluice bench``."""

from bench.cli import bench_cli

if __name__ == "__main__":
    bench_cli(prog_name="python -m bench")

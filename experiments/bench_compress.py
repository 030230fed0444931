"""Kept so published commands keep working: python -m experiments.bench_compress is experiments.bench.compress."""

from experiments.bench.compress import main
from experiments.common import run_main

if __name__ == "__main__":
    run_main(main)

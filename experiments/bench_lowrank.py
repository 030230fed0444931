"""Kept so published commands keep working: ``python -m experiments.bench_lowrank`` is experiments.bench.lowrank."""

from experiments.bench.lowrank import main
from experiments.common import run_main

if __name__ == "__main__":
    run_main(main)

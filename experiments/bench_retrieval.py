"""Kept so published commands keep working: ``python -m experiments.bench_retrieval`` is experiments.bench.retrieval."""

from experiments.bench.retrieval import main
from experiments.common import run_main

if __name__ == "__main__":
    run_main(main)

"""Kept so published commands keep working: ``python -m experiments.bench_spectra`` is experiments.bench.spectra."""

from experiments.bench.spectra import main

if __name__ == "__main__":
    raise SystemExit(main())

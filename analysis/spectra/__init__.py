"""Singular-value spectra of captured keys, values and queries per (layer, head): keys low-rank, values not."""

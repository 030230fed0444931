"""The figure pipeline (``python -m experiments.figures``): builds each study, then its figures, resumably."""

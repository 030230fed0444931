"""Figures: the plot builders, the figure registry and the writers of result directories."""

"""Merge vs evict, head by head: one step, teacher-forced, ideal merge, end to end."""

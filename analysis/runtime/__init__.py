"""Running a model: the attention kernel, the compressed cache, capture and replay."""

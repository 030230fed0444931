"""kvlens: what is inside an LLM's key/value cache, and what happens when you compress it."""

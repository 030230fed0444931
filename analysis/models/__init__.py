"""Loading models (the embedded SmolLM2 or any HF causal LM) and their attention layouts."""

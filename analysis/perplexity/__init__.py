"""What compression costs in perplexity: windows, decoding, jobs, the sweep, the stream, Table I."""

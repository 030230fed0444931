"""What compression costs in perplexity: windows, jobs over windows (the runner), the sweep, the stream, Table I."""

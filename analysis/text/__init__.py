"""Real text: the Debian corpora and the R-data reader behind the Austen novels."""

"""The dashboard's session helpers and the starter set it shows on first open."""

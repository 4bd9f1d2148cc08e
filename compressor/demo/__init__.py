"""Demo model and data that ship inside the package (see README.md here)."""

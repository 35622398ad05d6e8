"""Server tests (a package so its helpers import relatively and test names cannot clash)."""

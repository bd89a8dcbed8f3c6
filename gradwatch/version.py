"""The package version (a leaf, so the command line can print it without importing the package root)."""

__version__ = "0.1.0"

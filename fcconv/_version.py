"""The version of fcconv, readable without importing torch (the CLI and ``fcconv.__version__`` read it)."""

__version__ = "0.1.0"

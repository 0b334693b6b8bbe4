"""The version of netsurgeon (one place; ``netsurgeon.__version__`` re-exports it)."""
__version__ = "0.1.0"

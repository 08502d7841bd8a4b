"""l4proxy: a just-in-time access gateway for a chunking service."""

__version__ = "0.1.0"

"""Model Doctor: find where a language model bleeds under deployment modifications."""

__version__ = "0.1.0"

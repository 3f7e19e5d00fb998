"""The algorithm and what training itself needs; imports nothing else of the package."""

__version__ = "0.1.0"  # as in pyproject.toml

"""hindsight-py: a Python drop-in for Mozilla Hindsight."""

__version__ = "0.1.0"

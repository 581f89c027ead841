"""reconciler: make a folder of generated music converge to a folder of spec files."""

__version__ = "0.1.0"

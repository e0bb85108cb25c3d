"""Triton python-backend entry point of a Kiln model (copied here by `kiln repo`).

The implementation lives in the installed `serving` package (the python backend stub runs the
venv's interpreter, found through `python3` on PATH), so this file only names it.
"""

from serving.triton.model import KilnTritonModel as TritonPythonModel

__all__ = ["TritonPythonModel"]

"""The base of every error RedKnot raises for a bad input, a bad file or a refused setup.

Each subclass also derives from the builtin it specialises (``ValueError`` for bad values,
``RuntimeError`` for a refused or broken environment). The command line prints one of these
as one line naming the option and the fix; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RedKnotError(Exception):
    """An error whose message says what was expected, what was found and the remedy."""

"""Exceptions as the commands and logs report them.

Torch-free and importing nothing of the package, so that any module can use it (the loader's workers, ``mlgcn
compare``) without pulling in more than it already does.
"""

from __future__ import annotations


def one_line(err: BaseException) -> str:
    """``err`` as one line: its type and the first line of its message ("OSError: a zip cut short")."""
    return f"{type(err).__name__}: {first_line(err)}"


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message ("" for an empty one): a one-line report with the type beside it; the
    rest (torch's and PIL's messages run on for lines) belongs in the traceback."""
    lines = str(err).splitlines()
    return lines[0] if lines else ""

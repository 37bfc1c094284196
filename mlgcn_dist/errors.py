"""Exceptions as the commands and logs report them.

Torch-free and importing nothing of the package, so that any module can use it (the loader's workers, ``mlgcn
compare``) without pulling in more than it already does.
"""

from __future__ import annotations

from collections.abc import Iterator


def one_line(err: BaseException) -> str:
    """``err`` as one line: its type and the first line of its message ("OSError: a zip cut short")."""
    return f"{type(err).__name__}: {first_line(err)}"


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message ("" for an empty one): a one-line report with the type beside it; the
    rest (torch's and PIL's messages run on for lines) belongs in the traceback."""
    lines = str(err).splitlines()
    return lines[0] if lines else ""


def error_chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, then the error it was raised from or while handling, and so on, each once. Python wraps what a
    signal handler raises inside some hooks in an error of its own (a class body's ``__set_name__`` turns it into
    a RuntimeError), so an interruption is found along the chain, not only at its head."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


def interrupted(err: BaseException) -> bool:
    """Whether ``err`` is an interruption (Ctrl-C, a stop signal, an exit: a BaseException that is no Exception) or
    was raised from or while handling one: what no ``except Exception`` may take for a failure of its own."""
    return any(not isinstance(link, Exception) for link in error_chain(err))

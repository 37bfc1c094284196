"""The one-line report of an exception, and an interruption found along an error's chain."""

from __future__ import annotations

import pytest

from mlgcn_dist.errors import error_chain, first_line, interrupted, one_line


@pytest.mark.parametrize(("err", "line"), [
    (RuntimeError("a zip cut short\n  at byte 12\n"), "a zip cut short"),
    (ValueError("one line"), "one line"),
    (OSError("a zip cut short\r\n  at byte 12"), "a zip cut short"),  # a line end written on Windows
    (RuntimeError(), ""),  # str(err) empty: nothing to split, no IndexError
    (OSError(""), ""),
])
def test_first_line_is_the_messages_first_line_and_empty_for_an_empty_message(err, line):
    assert first_line(err) == line


def test_one_line_is_the_type_and_the_messages_first_line():
    assert one_line(RuntimeError("a zip cut short\n  at byte 12")) == "RuntimeError: a zip cut short"
    assert one_line(MemoryError()) == "MemoryError: "


def _raised(make):
    try:
        make()
    except BaseException as err:  # noqa: BLE001 - the error under test
        return err


def _wrapped_while_handling(interruption: BaseException) -> BaseException:
    def hook():
        try:
            raise interruption
        except BaseException as inner:  # noqa: BLE001 - as Python's __set_name__ hook wraps what it calls
            raise RuntimeError("Error calling __set_name__") from inner

    return _raised(hook)


def test_an_interruption_is_found_at_the_head_of_an_errors_chain_or_wrapped_anywhere_along_it():
    assert interrupted(KeyboardInterrupt()) and interrupted(SystemExit(1))
    wrapped = _wrapped_while_handling(KeyboardInterrupt())
    assert isinstance(wrapped, RuntimeError) and interrupted(wrapped)
    assert [type(link) for link in error_chain(wrapped)] == [RuntimeError, KeyboardInterrupt]
    assert not interrupted(_raised(lambda: 1 / 0))
    assert not interrupted(_wrapped_while_handling(ValueError("a failure of its own")))


def test_an_errors_chain_that_loops_is_walked_once():
    first, second = RuntimeError("first"), RuntimeError("second")
    first.__context__, second.__context__ = second, first
    assert list(error_chain(first)) == [first, second] and not interrupted(first)

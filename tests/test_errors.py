"""The one-line report of an exception."""

from __future__ import annotations

import pytest

from mlgcn_dist.errors import first_line, one_line


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

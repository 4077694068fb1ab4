"""Errors that carry the exit code the command line reports for them."""

from __future__ import annotations


class FcconvError(Exception):
    """A failure fcconv can explain in one line; ``exit_code`` is what the CLI returns."""

    exit_code = 2


class BadInputError(FcconvError):
    """The file, flag or model given cannot be used as asked (exit code 2)."""

    exit_code = 2


class NotConvertibleError(FcconvError):
    """The model cannot be made fully convolutional exactly (exit code 3)."""

    exit_code = 3


class FcconvWarning(UserWarning):
    """Something about a model that fcconv cannot decide and the user should check (the CLI prints it on stderr)."""


def reason(exc: BaseException) -> str:
    """``exc``'s message on one line and at most 200 characters (its type's name where it has none), to quote."""
    text = " ".join(str(exc).split())
    return (text[:200] + "…") if len(text) > 200 else (text or type(exc).__name__)

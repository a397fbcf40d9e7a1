"""The one user-facing error type of dpft.

Anything a user can get wrong (a file, a key, a value) raises :class:`DpftError` with a one-paragraph
message that names the culprit and says what was expected. The CLI prints the message without a stack
trace and exits with status 2.
"""
from __future__ import annotations


class DpftError(Exception):
    """A problem with user input (file, config key, value) described in one paragraph."""

    exit_code = 2

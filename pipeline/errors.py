"""The two kinds of failure `subjectforge` reports without a stack trace (pipeline/cli.py main).

- UserError: something the user can fix (a setting, a flag, a missing or damaged input, a server
  that does not answer); the command exits 2 with the message. ConfigError is one.
- JobFailed: the job ran and failed (a subject with no usable photo); the command exits 1.

Other exceptions are bugs and keep their stack trace.
"""


class UserError(Exception):
    """Something the user can fix; the message says what (and names the key, flag or file)."""


class JobFailed(RuntimeError):
    """A job that ran and failed; the message says why."""

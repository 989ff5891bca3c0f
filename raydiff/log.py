"""raydiff's one logger: `logging.getLogger("raydiff")`, and each module's child `logging.getLogger(__name__)`.

Every line goes to stdout as "[raydiff] <message>" ("[raydiff] WARNING: <message>" from warnings up): users and
tests read raydiff's lines there, and Ray forwards each worker's stdout to the driver. `setup` runs when the `raydiff`
package is imported, so the driver, the Ray Train workers and controller, and Ray Data and Tune actors all log alike.
The logger does not propagate: Ray Train gives its workers a root console handler, which would print every line again.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "raydiff"
PREFIX = "[raydiff] "
_HANDLER_NAME = "raydiff-stdout"


class _Stdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a line is logged (a redirect, pytest's capture), flushed per line."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns one; this handler always follows sys.stdout
        pass


class Prefix(logging.Formatter):
    """The prefix before every line of a message (a multi-line block, a traceback); the level from WARNING up."""

    def format(self, record: logging.LogRecord) -> str:
        lines = super().format(record).split("\n")
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return "\n".join([PREFIX + level + lines[0], *(PREFIX + line for line in lines[1:])])


def setup() -> logging.Logger:
    """Give the raydiff logger its stdout handler, once per process (calling again changes nothing)."""
    logger = logging.getLogger(LOGGER)
    if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        handler = _Stdout()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(Prefix())
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger

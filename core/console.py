"""A driver's terminal shows the project's own lines; everything else Ray prints goes to a log file.

Ray forwards every worker's and actor's output to the driver, prefixed with the process ("(RayTrainWorker
pid=7408) ..."), and adds its own notices and warnings: a person training a model wants the progress lines.
Ray prints forwarded lines through `sys.stdout`/`sys.stderr` as they arrive, so a line filter there sees them;
what is written straight to file descriptors 1 and 2 (native code, logging handlers made at import) goes to
the log with them. The log keeps every line, the project's included.
"""
from __future__ import annotations

import io
import os
import re
import sys
from contextlib import contextmanager
from typing import Iterator

# Ray's prefix on a forwarded line, with or without its colour codes
_RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?\([^()]*pid=\d+[^()]*\)(?:\x1b\[[0-9;]*m)?\s?")


class _LineSplit(io.TextIOBase):
    """Whole lines carrying `tag` to the console (without Ray's prefix); every line to the log. Ray forwards a
    worker's stdout and stderr alike, so both streams' tagged lines go to the one console stream."""

    def __init__(self, console, log, tag: str):
        self._console, self._log, self._tag, self._pending = console, log, tag, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._log.write(line + "\n")
            if self._tag in line:
                self._console.write(_RAY_PREFIX.sub("", line) + "\n")
                self._console.flush()
        self._log.flush()
        return len(text)

    def flush(self) -> None:
        self._log.flush()
        self._console.flush()

    def fileno(self) -> int:
        return self._log.fileno()

    def end_line(self) -> None:
        """Write out a last line that lacks its newline."""
        if self._pending:
            self.write("\n")


@contextmanager
def ray_output_to_log(log_path: str, tag: str) -> Iterator[None]:
    """Within the block: lines containing `tag` reach the terminal, all output is appended to `log_path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    streams = sys.stdout, sys.stderr
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout, sys.stderr = _LineSplit(console, log, tag), _LineSplit(console, log, tag)
    try:
        yield
    finally:
        for split in (sys.stdout, sys.stderr):
            if isinstance(split, _LineSplit):
                split.end_line()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for handle in (console, log):
            handle.close()
        for fd in saved:
            os.close(fd)

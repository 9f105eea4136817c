"""Progress bars for long jobs: a bar on a terminal, a line a minute into a log."""

from __future__ import annotations

import sys
from typing import Any, Iterable

import tqdm


class LogLines:
  """A stream for tqdm that writes each refresh as a line (for logs, not terminals)."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> None:
    text = text.replace("\r", "").rstrip()
    if text:
      self._stream.write(text + "\n")

  def flush(self) -> None:
    self._stream.flush()


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
        unit: str = "it", initial: int = 0) -> tqdm.tqdm:
  """``tqdm`` on stderr: refreshed in place on a terminal, a line a minute into a log."""
  terminal = sys.stderr.isatty()
  return tqdm.tqdm(iterable, total=total, initial=initial, unit=unit, desc=desc,
                   file=sys.stderr if terminal else LogLines(sys.stderr),
                   mininterval=0.5 if terminal else 60.0, ascii=not terminal,
                   dynamic_ncols=terminal)

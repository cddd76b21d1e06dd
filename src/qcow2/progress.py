"""qemu-img's -p progress output: "    (NN.NN/100%)" lines ended by a carriage return on
stdout, a newline at the end. Programs that drive qemu-img (oVirt's vdsm, for one) parse
these lines with a regular expression such as `\\((\\d+\\.\\d+)/100%\\)`, so the format is
kept byte for byte. Light: no numpy, imported by the CLI only when -p is given."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO


class QemuProgress:
    """Progress as qemu-img prints it (util/qemu-progress.c's rules): the first value, then
    a new line whenever the percentage moved by more than min_skip since the last printed
    one, and 100% each time it is reached; close() ends the output with a newline, once.

    Call it with a percentage, or give it a byte total and call update(n) with the bytes
    done since the last call (the interface convert's copy loops use)."""

    def __init__(self, min_skip: float = 1.0, total: int = 0,
                 stream: TextIO | None = None) -> None:
        self.min_skip = min_skip
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stdout
        self.current = 0.0
        self.last: float | None = None  # the last value printed
        self.closed = False

    def __call__(self, pct: float) -> None:
        pct = min(100.0, max(0.0, pct))
        self.current = pct
        last = self.last
        if last is None or pct > last + self.min_skip or pct < last - self.min_skip \
                or pct in (0.0, 100.0):
            self.last = pct
            self.stream.write(f"    ({pct:.2f}/100%)\r")
            self.stream.flush()

    def update(self, n: int) -> None:
        self.done += n
        self(100.0 * self.done / self.total if self.total > 0 else 100.0)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> QemuProgress:
        self(0.0)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self(100.0)
        self.close()  # as qemu-img: the newline after an error too

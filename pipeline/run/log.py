"""What a run says on the console: one logger, `dusa`, shown by the first process.

Every process of a run executes the same code: a message below ERROR is written by rank 0 alone (RANK of the
launcher, else torch.distributed's rank, else 0), so a run prints one line per event; errors are written by
every rank that has one (they say which rank). Information goes to stdout, warnings and errors to stderr,
each as its bare text. The streams are looked up when a line is written, so redirections (and pytest's
capture) see them. The libraries' own output is quieted apart (launch/tta.py: `quiet_libraries`)."""
from __future__ import annotations

import logging
import os
import sys

LOG = logging.getLogger("dusa")


def rank() -> int:
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR and rank() != 0:
            return
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise into the run
            self.handleError(record)


if not any(isinstance(h, _ConsoleHandler) for h in LOG.handlers):
    _handler = _ConsoleHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(_handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False  # not again through the root logger's handlers (W&B and others configure some)

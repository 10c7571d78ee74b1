"""Progress of a long measurement on stderr: one bar over its steps, naming the step under way."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


class Phases:
    """A tqdm bar on stderr (stdout stays the result's) whose postfix names the step being measured."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Show ``what`` while the block runs; count one step when it is done."""
        self.bar.set_postfix_str(what)
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

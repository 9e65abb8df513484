"""Progress bars on stderr (tqdm), for loading a checkpoint (by bytes), training and evaluation.

A bar is drawn only when stderr is a terminal, so logs, pipes and tests get no bar; `disable()` (the CLI's
`--no-progress`) or `INSTRUCTBLIP_PROGRESS=0` turns every bar off, `INSTRUCTBLIP_PROGRESS=1` forces them on.
No torch here.
"""

from __future__ import annotations

import os
import sys

_disabled = False


def disable() -> None:
    """No progress bars for the rest of the process."""
    global _disabled
    _disabled = True


def wanted(enabled: bool = True, force: bool = False) -> bool:
    """Whether a bar would be drawn: `enabled`, not disabled, and stderr a terminal (or `force`, or
    INSTRUCTBLIP_PROGRESS=1)."""
    setting = os.environ.get("INSTRUCTBLIP_PROGRESS")
    if not enabled or _disabled or setting == "0":
        return False
    return force or setting == "1" or sys.stderr.isatty()


class _Off:
    """What `progress_bar` returns when no bar is drawn: the same calls, doing nothing."""

    n = 0
    disable = True  # as tqdm's attribute: nothing is drawn

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=sys.stderr)

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 force: bool = False):
    """A tqdm bar on stderr, or a stand-in that draws nothing (see `wanted`); `bar.disable` tells which. unit="B":
    bytes, shown as KiB/MiB/GiB."""
    if not wanted(enabled, force):
        return _Off()
    from tqdm.auto import tqdm

    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                initial=initial, file=sys.stderr, dynamic_ncols=True, leave=False)

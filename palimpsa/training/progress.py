"""Progress of one run: a tqdm bar on a terminal, otherwise a plain line every ~5% and at each eval.

The plain line is what a job log shows: ``step 40/200 (20%)  loss 3.9121  val_accuracy 0.0520  8s  eta 32s``
(the ETA assumes the run goes to its last step; a target or patience may end it sooner).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

from palimpsa.diagnostics import summary


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, disable=not self.interactive, dynamic_ncols=True)
        self.enabled, self.total, self.initial = enabled, total, initial
        self.every = max(1, total // 20)
        self.start = time.perf_counter()
        self.last_metric: str | None = None  # the latest eval's metric, shown on every line

    def update(self, step: int, loss: float | None) -> None:
        """One step done; ``loss`` is the last logged training loss (read back every log interval)."""
        if self.interactive:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.enabled and step % self.every == 0:
            self.write(self.line(step, loss))

    def line(self, step: int, loss: float | None) -> str:
        """Step, loss, the latest eval metric, time so far and the time left at this session's pace."""
        elapsed = time.perf_counter() - self.start
        done = step - self.initial
        eta = elapsed / done * (self.total - step) if done > 0 else None
        parts = [
            f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)",
            f"loss {'-' if loss is None else f'{loss:.4f}'}",
            *([self.last_metric] if self.last_metric else []),
            _duration(elapsed),
            f"eta {'-' if eta is None else _duration(eta)}",
        ]
        return "  ".join(parts)

    def eval_line(self, entry: dict[str, Any], metric: str) -> None:
        if not self.enabled:
            return
        text = f"eval step {entry['step']}  val_loss {entry['val_loss']:.4f}"
        self.last_metric = f"val_loss {entry['val_loss']:.4f}"
        if metric == "accuracy":
            text += f"  val_accuracy {entry['val_accuracy']:.4f}"
            self.last_metric = f"val_accuracy {entry['val_accuracy']:.4f}"
            if self.interactive:
                self.bar.set_postfix(acc=f"{entry['val_accuracy']:.3f}", refresh=False)
        extra = summary(entry.get("diagnostics", {}))
        self.write(f"{text}  {extra}" if extra else text)

    def write(self, text: str) -> None:
        if self.interactive:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    """``8s``, ``4m05s``, ``2h03m``: short enough for a log line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"

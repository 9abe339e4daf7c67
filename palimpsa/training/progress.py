"""Progress of one run: a tqdm bar on a terminal, otherwise a plain line every ~5% and at each eval."""

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
        self.enabled, self.total = enabled, total
        self.every = max(1, total // 20)
        self.start = time.perf_counter()

    def update(self, step: int, loss: float | None) -> None:
        """One step done; ``loss`` is the last logged training loss (read back every log interval)."""
        if self.interactive:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.enabled and step % self.every == 0:
            shown = "-" if loss is None else f"{loss:.4f}"
            self.write(f"step {step}/{self.total}  loss {shown}  {time.perf_counter() - self.start:.1f}s")

    def eval_line(self, entry: dict[str, Any], metric: str) -> None:
        if not self.enabled:
            return
        text = f"eval step {entry['step']}  val_loss {entry['val_loss']:.4f}"
        if metric == "accuracy":
            text += f"  val_accuracy {entry['val_accuracy']:.4f}"
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

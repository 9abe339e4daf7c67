"""Generate one task dataset into the shared cache (``palimpsa.tasks.build_task``), then write a marker.

    build_data.py --spec '{"task": {...}, "seed": 0}' --cache results/data --out MARKER

The workflow runs this once per (task config, seed) before the training jobs that read it, so
parallel jobs never generate the same data twice or race on the cache file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from palimpsa.config import ConfigError, parse_task  # noqa: E402
from palimpsa.tasks import TaskError, build_task  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", required=True, help="JSON: {task: mapping, seed: int}")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    try:
        task = parse_task(spec["task"])
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        data = build_task(task, args.cache, seed=int(spec["seed"]))
    except TaskError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = {name: list(getattr(data, name).shape) for name in data.TENSORS}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(
        json.dumps({**spec, "shapes": sizes, "seconds": time.perf_counter() - start}, indent=1) + "\n"
    )
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run a command with its own GPUs: ``gpu_slot.py --gpus N -- CMD ...``.

Snakemake's ``resources: gpu`` only counts GPUs; it does not say which. This launcher takes N free
slots among the visible GPUs by file lock (held for the command's lifetime, released by the kernel
even if the job is killed), sets ``CUDA_VISIBLE_DEVICES`` to them and runs the command. With
``--gpus 0`` it hides every GPU, so CPU jobs on a GPU box stay off the devices. Under SLURM the
allocation already sets ``CUDA_VISIBLE_DEVICES``; the command runs unchanged.

Small models leave a GPU mostly idle: ``$PALIMPSA_JOBS_PER_GPU`` (default 1) lets that many jobs share
each GPU; then raise ``--resources gpu=`` to GPUs x jobs per GPU.

Visible GPUs: ``$CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``. Locks live in
``$PALIMPSA_GPU_LOCK_DIR`` (default: a per-user folder in the temp dir), so concurrent workflows on
one machine share the slots.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in (x.strip() for x in env.split(",")) if g and g != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def take_slots(
    gpus: list[str], n: int, lock_dir: Path, per_gpu: int = 1, poll_s: float = 0.5
) -> tuple[list[str], list[int]]:
    """Block until ``n`` distinct GPUs each have a free slot (``per_gpu`` a GPU); return ids and locks."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    slots = [(gpu, i) for i in range(per_gpu) for gpu in gpus]  # spread jobs over GPUs before stacking
    while True:
        held: list[tuple[str, int]] = []
        for gpu, i in slots:
            if any(g == gpu for g, _ in held):
                continue
            name = f"gpu-{gpu}.lock" if i == 0 else f"gpu-{gpu}-{i}.lock"
            fd = os.open(lock_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append((gpu, fd))
            if len(held) == n:
                return [g for g, _ in held], [fd for _, fd in held]
        for _, fd in held:  # not enough: release and retry, never sit on a partial set
            os.close(fd)
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpus", type=int, default=0, help="GPUs this job needs")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("no command given")
    env = dict(os.environ)
    fds: list[int] = []
    if os.environ.get("SLURM_JOB_ID"):
        pass  # the scheduler already bound the job's GPUs
    elif args.gpus <= 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        gpus = visible_gpus()
        if len(gpus) < args.gpus:
            print(f"error: the job needs {args.gpus} GPU(s) but {len(gpus)} are visible", file=sys.stderr)
            return 1
        default_dir = Path(tempfile.gettempdir()) / f"palimpsa-gpu-slots-{os.getuid()}"
        lock_dir = Path(os.environ.get("PALIMPSA_GPU_LOCK_DIR", default_dir))
        per_gpu = int(os.environ.get("PALIMPSA_JOBS_PER_GPU", "1"))
        if per_gpu < 1:
            print(f"error: PALIMPSA_JOBS_PER_GPU must be >= 1, got {per_gpu}", file=sys.stderr)
            return 1
        chosen, fds = take_slots(gpus, args.gpus, lock_dir, per_gpu)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
        print(f"gpu_slot: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env)
    for sig in (signal.SIGTERM, signal.SIGINT):  # pass Snakemake's cancellation on to the job
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    rc = proc.wait()
    for fd in fds:
        os.close(fd)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    raise SystemExit(main())

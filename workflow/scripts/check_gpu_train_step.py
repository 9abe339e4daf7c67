"""One MQAR training step on the GPU: the Triton path against the reference path.

    python workflow/scripts/check_gpu_train_step.py [--out FILE.md]

Builds the `ablations/mqar-tiny.yaml` model for Palimpsa and MetaMamba2, copies the weights, and runs the same
batch through both paths: the GPU path (Triton kernels, bf16 autocast, as training runs there) and the torch
reference in fp32. Prints and optionally writes the loss and the relative gradient error of every parameter
tensor, worst first. Needs CUDA.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from palimpsa.config import load_config
from palimpsa.model import build_model
from palimpsa.tasks import build_task

ROOT = Path(__file__).resolve().parents[2]


def loss_and_grads(model, inputs, targets, autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), {
        n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None
    }


def compare(kind: str, batch: int, device: str) -> list[str]:
    cfg = load_config(
        ROOT / "ablations/mqar-tiny.yaml", [f"model.mixer.kind={kind}", "model.mixer.ip_trainable=true"]
    )
    data = build_task(cfg.task, seed=cfg.seed)
    torch.manual_seed(0)
    fast = build_model(cfg, data.vocab_size).to(device)
    ref = copy.deepcopy(fast)
    for module in ref.modules():  # every mixer config is the same object type; force the reference op
        cfg_obj = getattr(module, "cfg", None)
        if cfg_obj is not None and hasattr(cfg_obj, "backend"):
            cfg_obj = copy.copy(cfg_obj)
            cfg_obj.backend = "reference"
            module.cfg = cfg_obj
    inputs = data.train_inputs[:batch].to(device).long()
    targets = data.train_targets[:batch].to(device).long()
    loss_fast, g_fast = loss_and_grads(fast, inputs, targets, autocast=device == "cuda")
    loss_fp32, g_fp32 = loss_and_grads(fast, inputs, targets, autocast=False)
    loss_ref, g_ref = loss_and_grads(ref.double(), inputs, targets, autocast=False)
    rows = [f"### {kind}: backends {fast.backends()} vs {ref.backends()}", ""]
    rows.append(
        f"loss: triton bf16 {loss_fast:.6f}, triton fp32 {loss_fp32:.6f}, reference fp64 {loss_ref:.6f}"
    )
    rel = lambda a, b: ((a - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()  # noqa: E731
    errors = sorted(((rel(g_fast[n], g_ref[n]), rel(g_fp32[n], g_ref[n]), n) for n in g_ref), reverse=True)
    rows += ["", "| parameter | rel. grad error, triton bf16 | triton fp32 |", "|---|---|---|"]
    rows += [f"| {n} | {a:.2e} | {b:.2e} |" for a, b, n in errors[:8]]
    rows.append(
        f"| (all {len(errors)} tensors, max) | {errors[0][0]:.2e} | {max(e[1] for e in errors):.2e} |"
    )
    return rows + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cpu only checks the script itself (chunk vs reference)")
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [f"# One MQAR training step on {name}", ""]
    for kind in ("palimpsa", "metamamba2"):
        lines += compare(kind, args.batch, args.device)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Host-side helpers of the Triton path: sequence/chunk bookkeeping and precision choices."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def autocast_inputs(*xs: Tensor) -> tuple[Tensor, ...]:
    """The inputs as autocast would hand them to a matmul: under autocast on their device, every floating
    tensor but a float64 one in autocast's dtype (the rule of ``torch.amp.custom_fwd(cast_inputs=...)``);
    otherwise unchanged. A layer's norms and gates leave fp32-listed ops (``rsqrt``, ``softplus``) in fp32,
    and one fp32 ``q`` would run every product of the op in IEEE fp32 (``dot_precision``) and return fp32."""
    device = xs[0].device.type
    if not torch.is_autocast_enabled(device):
        return xs
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x for x in xs)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (the 1e-5 target); 16-bit inputs get tf32, below their rounding."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class SequenceLayout:
    """Where each sequence and each chunk lives in the flattened ``[1, total_T]`` token axis."""

    cu_seqlens: Tensor  # [N + 1] int32, token offsets of the sequences
    chunk_offsets: Tensor  # [N + 1] int32, first global chunk of each sequence
    chunk_index: Tensor  # [NT, 2] int32, (sequence, chunk within sequence) of each global chunk
    num_seqs: int
    num_chunks: int


def sequence_layout(
    B: int, T: int, cu_seqlens: Tensor | None, chunk: int, device: torch.device
) -> SequenceLayout:
    """Chunk bookkeeping for a plain batch (``B`` sequences of ``T``) or a varlen batch."""
    if cu_seqlens is None:
        nt = -(-T // chunk)
        cu = torch.arange(B + 1, device=device, dtype=torch.int32) * T
        offsets = torch.arange(B + 1, device=device, dtype=torch.int32) * nt
        g = torch.arange(B * nt, device=device, dtype=torch.int32)
        index = torch.stack([g // nt, g % nt], dim=1).contiguous()
        return SequenceLayout(cu, offsets, index, B, B * nt)
    cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    lens = (cu[1:] - cu[:-1]).long()
    if bool((lens <= 0).any()):
        raise ValueError("cu_seqlens must be strictly increasing (empty sequences are not supported)")
    n = lens.numel()
    nts = (lens + chunk - 1) // chunk
    offsets = torch.cat([nts.new_zeros(1), nts.cumsum(0)])
    total = int(offsets[-1])
    seq_of_chunk = torch.arange(n, device=device).repeat_interleave(nts)
    within = torch.arange(total, device=device) - offsets[:-1][seq_of_chunk]
    index = torch.stack([seq_of_chunk, within], dim=1).to(torch.int32).contiguous()
    return SequenceLayout(cu, offsets.to(torch.int32), index, n, total)

"""FP8 (e4m3) per-token, per-128-channel casts and UE8M0 scale packing.

The recipe is the contract of ``docs/design.md`` (low-latency section); the NVLink kernels
reproduce it bit for bit, so every step is spelled out in float32:

* ``amax`` = max of ``|x|`` over a block of 128 channels of one token;
* ``sf = max(amax, 1e-4) / 448``;
* with ``round_scale``: ``sf = 2^ceil(log2(sf))``, computed exactly on the float32 bits (a
  power of two stays, anything else moves to the next power of two);
* ``q = e4m3(clamp(x * (1 / sf), -448, 448))``, round to nearest even.

Scales are float32 ``[T, H / 128]``, or with UE8M0 int32 ``[T, ceil(H / 512)]``: four biased
exponents per int32, byte ``b`` of pack ``p`` (little-endian, byte 0 lowest) holds block
``4 * p + b`` and means ``2^(byte - 127)``; missing trailing blocks are packed as byte 0.
"""

from __future__ import annotations

import torch

__all__ = [
    "FP8_AMAX_FLOOR",
    "FP8_BLOCK",
    "FP8_MAX",
    "UE8M0_BLOCKS_PER_PACK",
    "num_fp8_scale_columns",
    "pack_ue8m0",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
    "round_scale_to_pow2",
    "unpack_ue8m0",
]

FP8_MAX = 448.0
"""Largest finite e4m3 magnitude."""

FP8_BLOCK = 128
"""Channels sharing one scale."""

FP8_AMAX_FLOOR = 1e-4
"""Lower bound of ``amax`` (keeps all-zero blocks finite)."""

UE8M0_BLOCKS_PER_PACK = 4
"""UE8M0 exponents per int32."""

_MANTISSA_BITS = 23
_MANTISSA_MASK = (1 << _MANTISSA_BITS) - 1


def num_fp8_scale_columns(hidden: int, use_ue8m0: bool = False) -> int:
    """Scale columns ``P`` for a hidden size: ``H / 128`` floats or ``ceil(H / 512)`` packs."""
    blocks = hidden // FP8_BLOCK
    return -(-blocks // UE8M0_BLOCKS_PER_PACK) if use_ue8m0 else blocks


def round_scale_to_pow2(sf: torch.Tensor) -> torch.Tensor:
    """Rounds positive normal float32 scales up to a power of two, exactly.

    Works on the bits: a scale with a zero mantissa is already ``2^e`` and stays; any other
    moves to ``2^(e + 1)``. This equals ``2^ceil(log2(sf))`` without float ``log2`` rounding.

    Args:
        sf: float32 tensor of positive normal values, any shape and device.

    Returns:
        float32 tensor of the same shape.
    """
    bits = sf.contiguous().view(torch.int32)
    exponent = bits >> _MANTISSA_BITS
    exact = (bits & _MANTISSA_MASK) == 0
    rounded = torch.where(exact, exponent, exponent + 1) << _MANTISSA_BITS
    return rounded.view(torch.float32)


def pack_ue8m0(sf: torch.Tensor) -> torch.Tensor:
    """Packs power-of-two float32 scales ``[T, B]`` into int32 UE8M0 packs ``[T, ceil(B/4)]``.

    Byte ``b`` of pack ``p`` is the biased exponent of block ``4p + b``; padding bytes are 0.
    """
    num_tokens, num_blocks = sf.shape
    num_packs = -(-num_blocks // UE8M0_BLOCKS_PER_PACK)
    exponents = (sf.contiguous().view(torch.int32) >> _MANTISSA_BITS) & 0xFF
    padded = torch.zeros(
        num_tokens, num_packs * UE8M0_BLOCKS_PER_PACK, dtype=torch.uint8, device=sf.device
    )
    padded[:, :num_blocks] = exponents.to(torch.uint8)
    # Little-endian byte order: byte 0 is the lowest byte of the int32 on every supported device.
    return padded.view(torch.int32)


def unpack_ue8m0(packed: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Unpacks int32 UE8M0 packs ``[T, P]`` into float32 scales ``[T, num_blocks]``."""
    exponents = packed.contiguous().view(torch.uint8)[:, :num_blocks].to(torch.int32)
    return (exponents << _MANTISSA_BITS).view(torch.float32)


def per_token_cast_to_fp8(
    x: torch.Tensor, *, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Casts ``x`` to e4m3 with one scale per token and 128 channels (recipe in module doc).

    Runs on ``x``'s device and current stream; asynchronous on CUDA.

    Args:
        x: ``[T, H]`` bf16 or float32, ``H % 128 == 0``.
        round_scale: Round each scale up to a power of two.
        use_ue8m0: Return UE8M0 int32 packs (requires ``round_scale``).

    Returns:
        ``(q, scales)``: ``q`` ``[T, H]`` float8_e4m3fn; ``scales`` ``[T, H/128]`` float32, or
        ``[T, ceil(H/512)]`` int32 with ``use_ue8m0``. Both contiguous, on ``x``'s device.

    Raises:
        ValueError: ``H`` is not a multiple of 128, ``x`` is not 2-D, or ``use_ue8m0`` without
            ``round_scale``.
    """
    if x.dim() != 2 or x.shape[1] % FP8_BLOCK != 0:
        raise ValueError(f"x must be [T, H] with H % {FP8_BLOCK} == 0, got {tuple(x.shape)}")
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True requires round_scale=True (UE8M0 holds powers of two)")
    num_tokens, hidden = x.shape
    blocks = x.float().reshape(num_tokens, hidden // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=2)
    # A tensor divisor keeps true IEEE division on every device: CUDA turns `t / scalar` into
    # `t * (1 / scalar)`, which rounds differently (and the NVLink kernels divide).
    sf = torch.clamp_min(amax, FP8_AMAX_FLOOR) / torch.full_like(amax, FP8_MAX)
    if round_scale:
        sf = round_scale_to_pow2(sf)
    inv = torch.reciprocal(sf)
    q = torch.clamp(blocks * inv.unsqueeze(2), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(num_tokens, hidden)
    return q, (pack_ue8m0(sf) if use_ue8m0 else sf.contiguous())


def per_token_cast_back(
    q: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of :func:`per_token_cast_to_fp8`: ``float(q) * sf`` per 128-channel block.

    Args:
        q: ``[T, H]`` float8_e4m3fn.
        scales: ``[T, H/128]`` float32, or ``[T, ceil(H/512)]`` int32 UE8M0 packs; any strides.
        out_dtype: dtype of the result.

    Returns:
        ``[T, H]`` of ``out_dtype`` on ``q``'s device.
    """
    num_tokens, hidden = q.shape
    num_blocks = hidden // FP8_BLOCK
    sf = unpack_ue8m0(scales, num_blocks) if scales.dtype == torch.int32 else scales.float()
    blocks = q.float().reshape(num_tokens, num_blocks, FP8_BLOCK) * sf.unsqueeze(2)
    return blocks.reshape(num_tokens, hidden).to(out_dtype)

"""The FP8 recipe against scalar float32 arithmetic, and the UE8M0 packing."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from ep_core.fp8 import (
    num_fp8_scale_columns,
    pack_ue8m0,
    per_token_cast_back,
    per_token_cast_to_fp8,
    round_scale_to_pow2,
    unpack_ue8m0,
)


def _f32(value: float) -> float:
    """Rounds a Python float to float32 (once: double results of +,*,/ on float32 inputs are
    exact or round innocuously, so this equals float32 arithmetic)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _scalar_scales(x: torch.Tensor, round_scale: bool) -> list[list[float]]:
    """Per-block scales computed one block at a time with scalar float32 arithmetic."""
    rows = x.float().tolist()
    out = []
    for row in rows:
        scales = []
        for b in range(len(row) // 128):
            amax = max(abs(v) for v in row[b * 128 : (b + 1) * 128])
            sf = _f32(max(amax, _f32(1e-4)) / 448.0)
            if round_scale:
                mantissa, exponent = math.frexp(sf)
                sf = math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)
            scales.append(sf)
        out.append(scales)
    return out


def _inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 512, generator=gen) * torch.exp2(torch.randint(-8, 9, (6, 1), generator=gen))
    x[0, :128] = 0.0  # amax below the floor
    x[1, :128] = 448.0 * 0.25  # sf exactly a power of two: rounding must keep it
    x[1, 5] = -448.0 * 0.25
    x[2, 128:256] = 3.0  # every element equal: q hits exactly 448
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("round_scale", [False, True])
def test_cast_matches_scalar_recipe(round_scale: bool) -> None:
    x = _inputs()
    q, sf = per_token_cast_to_fp8(x, round_scale=round_scale)
    want_sf = _scalar_scales(x, round_scale)
    assert sf.dtype == torch.float32 and sf.shape == (6, 4)
    assert sf.tolist() == want_sf
    # Quantise element by element in float32; only the final e4m3 rounding is torch's.
    want = []
    for t, row in enumerate(x.float().tolist()):
        scaled = []
        for h, v in enumerate(row):
            inv = _f32(1.0 / want_sf[t][h // 128])
            scaled.append(min(max(_f32(v * inv), -448.0), 448.0))
        want.append(scaled)
    want_q = torch.tensor(want, dtype=torch.float32).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    if not round_scale:
        assert float(q[2, 128:256].float().max()) == 448.0
    else:
        assert float(sf[1, 0]) == 0.25  # exact power of two kept, not doubled


def test_round_scale_to_pow2_exact() -> None:
    values = torch.tensor([1.0, 0.75, 2.0**-20, 3.0 * 2.0**-20, 1.0000001, 0.5000001, 448.0])
    got = round_scale_to_pow2(values).tolist()
    assert got == [1.0, 1.0, 2.0**-20, 2.0**-18, 2.0, 1.0, 512.0]


def test_round_trip_error_bounded() -> None:
    x = _inputs()
    for round_scale in (False, True):
        q, sf = per_token_cast_to_fp8(x, round_scale=round_scale)
        back = per_token_cast_back(q, sf, out_dtype=torch.float32)
        ref = x.float()
        scale = sf.repeat_interleave(128, dim=1)
        # e4m3 keeps 3 mantissa bits: error <= 2^-4 relative, or half the smallest step.
        tol = ref.abs() * 2.0**-4 + scale * 2.0**-9
        assert bool(((back - ref).abs() <= tol).all())


def test_ue8m0_pack_layout() -> None:
    sf = torch.tensor([[1.0, 2.0, 0.5, 8.0, 32.0]])
    packed = pack_ue8m0(sf)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    first = 127 | 128 << 8 | 126 << 16 | 130 << 24
    assert packed[0, 0].item() == first - (1 << 32)  # two's complement of the unsigned pack
    assert packed[0, 1].item() == 132
    assert torch.equal(unpack_ue8m0(packed, 5), sf)


def test_ue8m0_cast_matches_rounded_float_scales() -> None:
    x = _inputs()[:, :384]  # 3 blocks: one pack with a zero padding byte
    q_float, sf = per_token_cast_to_fp8(x, round_scale=True)
    q_pack, packed = per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    assert packed.shape == (6, num_fp8_scale_columns(384, use_ue8m0=True)) == (6, 1)
    assert torch.equal(q_float.view(torch.uint8), q_pack.view(torch.uint8))
    assert torch.equal(unpack_ue8m0(packed, 3), sf)
    assert bool((packed.view(torch.uint8)[:, 3] == 0).all())
    assert torch.equal(per_token_cast_back(q_pack, packed), per_token_cast_back(q_float, sf))


def test_cast_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="H % 128"):
        per_token_cast_to_fp8(torch.zeros(2, 192, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="round_scale"):
        per_token_cast_to_fp8(torch.zeros(2, 128, dtype=torch.bfloat16), use_ue8m0=True)


def test_zero_tokens() -> None:
    q, sf = per_token_cast_to_fp8(
        torch.zeros(0, 256, dtype=torch.bfloat16), round_scale=True, use_ue8m0=True
    )
    assert q.shape == (0, 256) and sf.shape == (0, 1)

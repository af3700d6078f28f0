"""Input checks shared by every backend: user mistakes become ``ValueError``/``TypeError``.

Shape, dtype, device and contiguity checks read only metadata. The value checks of ``topk_idx``
(ids in ``[-1, E)``, no expert twice in a row) read the tensor on the host, which is a sync on
CUDA: they run unless ``EP_CHECK_INPUTS=0`` or the current CUDA stream is being captured. The
NVLink backend's dispatch with CPU sync checks the values on the device instead and reads the
verdict with its counts (one device-to-host read for both), raising the same errors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ep_core import knobs

__all__ = [
    "MAX_HIDDEN",
    "MAX_TOPK",
    "check_bias",
    "check_combine_x",
    "check_dispatch_x",
    "check_expert_alignment",
    "check_hidden",
    "check_num_experts",
    "check_positive_int",
    "check_tensor",
    "check_topk_idx",
    "check_topk_idx_values",
    "check_topk_weights",
    "should_check_values",
]

MAX_TOPK = 32
"""Largest supported ``k``."""

MAX_HIDDEN = 16384
"""Largest supported hidden size ``H``."""

BF16_HIDDEN_MULTIPLE = 64
FP8_HIDDEN_MULTIPLE = 128


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype],
    dim: int,
    device: torch.device,
    contiguous: bool = True,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {_shape(t)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the operation runs on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    return t


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Checks that ``value`` is an int (not a bool) and ``>= minimum``; returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_hidden(hidden: int, *, fp8: bool, name: str = "hidden") -> None:
    """Checks a hidden size: ``0 < H <= 16384``, ``H % 64 == 0`` (BF16) or ``% 128`` (FP8)."""
    multiple = FP8_HIDDEN_MULTIPLE if fp8 else BF16_HIDDEN_MULTIPLE
    if not 0 < hidden <= MAX_HIDDEN or hidden % multiple != 0:
        kind = "FP8" if fp8 else "BF16"
        raise ValueError(
            f"{name} {hidden} is unsupported for {kind}: need 0 < H <= {MAX_HIDDEN} and "
            f"H % {multiple} == 0"
        )


def check_num_experts(num_experts: object, num_ranks: int) -> int:
    """Checks ``E``: a positive int and a multiple of the rank count ``R``; returns it."""
    check_positive_int("num_experts", num_experts)
    assert isinstance(num_experts, int)
    if num_experts % num_ranks != 0:
        raise ValueError(
            f"num_experts {num_experts} is not a multiple of the number of ranks {num_ranks}"
        )
    return num_experts


def check_expert_alignment(expert_alignment: object) -> int:
    """Checks ``A >= 1``; returns it."""
    return check_positive_int("expert_alignment", expert_alignment)


def should_check_values(t: torch.Tensor) -> bool:
    """Whether value checks (host reads) may run for ``t`` now."""
    if not knobs.ep.check_inputs:
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_topk_idx(
    topk_idx: object,
    *,
    num_tokens: int,
    num_experts: int,
    device: torch.device,
    name: str = "topk_idx",
    values: bool = True,
) -> torch.Tensor:
    """Checks ``topk_idx``: ``[T, k]`` int64 contiguous, ``1 <= k <= 32``, ids in ``[-1, E)``,
    no expert twice in one row (the value checks follow :func:`should_check_values`; with
    ``values=False`` the caller has them done elsewhere, e.g. on the device by the backend).

    Returns:
        ``topk_idx`` itself.
    """
    t = _check_tensor(name, topk_idx, dtypes=(torch.int64,), dim=2, device=device)
    if t.shape[0] != num_tokens:
        raise ValueError(f"{name} has {t.shape[0]} rows but x has {num_tokens} tokens")
    k = t.shape[1]
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"{name} has k = {k} columns; need 1 <= k <= {MAX_TOPK}")
    if not values or t.numel() == 0 or not should_check_values(t):
        return t
    check_topk_idx_values(t, num_experts, name=name)
    return t


def check_topk_idx_values(t: torch.Tensor, num_experts: int, *, name: str = "topk_idx") -> None:
    """The value checks of :func:`check_topk_idx` alone (reads ``t`` on the host: a sync on
    CUDA): ids in ``[-1, E)``, no expert twice in one row; raises naming the first bad entry.

    Backends that check the values on the device call it to name the entry once a check failed.
    """
    bad = (t < -1) | (t >= num_experts)
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{row}, {col}] = {int(t[row, col])} is outside [-1, {num_experts}) "
            f"(num_experts = {num_experts})"
        )
    ordered = t.sort(dim=1).values
    dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(dup.any()):
        row, col = (int(v) for v in dup.nonzero()[0])
        expert = int(ordered[row, col])
        raise ValueError(f"{name} row {row} selects expert {expert} more than once")


def check_topk_weights(
    topk_weights: object, topk_idx: torch.Tensor, *, name: str = "topk_weights"
) -> torch.Tensor:
    """Checks ``topk_weights``: float32 contiguous with the shape of ``topk_idx``."""
    t = _check_tensor(name, topk_weights, dtypes=(torch.float32,), dim=2, device=topk_idx.device)
    if t.shape != topk_idx.shape:
        raise ValueError(f"{name} has shape {_shape(t)} but topk_idx has shape {_shape(topk_idx)}")
    return t


def check_dispatch_x(
    x: object,
    x_scales: object,
    *,
    num_max_tokens_per_rank: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checks dispatch data: bf16 ``[T, H]``, or e4m3 ``[T, H]`` with scales ``[T, P]``.

    Scales hold 4-byte values (float32 scales or int32 UE8M0 packs), ``1 <= P <= ceil(H/32)``,
    any strides. ``T <= num_max_tokens_per_rank``.

    Returns:
        ``(x, x_scales)``, the scales made contiguous (``None`` for BF16).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x must be a torch.Tensor or a (data, scales) tuple, got {type(x).__name__}"
        )
    fp8 = x_scales is not None
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    what = "x data of an FP8 (data, scales) tuple" if fp8 else "x"
    if x.dtype != dtype:
        hint = "" if fp8 else " (pass FP8 as a (data, scales) tuple)"
        raise TypeError(f"{what} must have dtype {dtype}, got {x.dtype}{hint}")
    _check_tensor("x", x, dtypes=(dtype,), dim=2, device=device)
    num_tokens, hidden = x.shape
    check_hidden(hidden, fp8=fp8, name="hidden size of x")
    if num_tokens > num_max_tokens_per_rank:
        raise ValueError(
            f"x has {num_tokens} tokens, more than num_max_tokens_per_rank = "
            f"{num_max_tokens_per_rank}"
        )
    if not fp8:
        return x, None
    s = _check_tensor(
        "x scales",
        x_scales,
        dtypes=(torch.float32, torch.int32),
        dim=2,
        device=device,
        contiguous=False,
    )
    max_cols = -(-hidden // 32)
    if s.shape[0] != num_tokens or not 1 <= s.shape[1] <= max_cols:
        raise ValueError(
            f"x scales must be [T={num_tokens}, P] with 1 <= P <= ceil(H/32) = {max_cols}, "
            f"got {_shape(s)}"
        )
    return x, s.contiguous()


def check_bias(
    bias: object, *, num_tokens: int, hidden: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Normalises and checks combine's bias: ``None``, a tensor or a tuple of up to two.

    Each bias is bf16 contiguous ``[T, H]`` (``T`` tokens of the original dispatch).

    Returns:
        A tuple of 0, 1 or 2 tensors.
    """
    if bias is None:
        return ()
    items = (bias,) if isinstance(bias, torch.Tensor) else bias
    if not isinstance(items, tuple | list):
        raise TypeError(
            f"bias must be None, a tensor or a tuple of tensors, got {type(bias).__name__}"
        )
    if len(items) > 2:
        raise ValueError(f"bias takes at most 2 tensors, got {len(items)}")
    out = []
    for i, b in enumerate(items):
        name = f"bias[{i}]"
        t = _check_tensor(name, b, dtypes=(torch.bfloat16,), dim=2, device=device)
        if _shape(t) != (num_tokens, hidden):
            raise ValueError(f"{name} must have shape {(num_tokens, hidden)}, got {_shape(t)}")
        out.append(t)
    return tuple(out)


def check_combine_x(
    x: object, *, num_rows: int, device: torch.device, name: str = "x"
) -> torch.Tensor:
    """Checks combine data: bf16 contiguous ``[num_rows, H]`` with a supported ``H``."""
    t = _check_tensor(name, x, dtypes=(torch.bfloat16,), dim=2, device=device)
    if t.shape[0] != num_rows:
        raise ValueError(
            f"{name} has {t.shape[0]} rows but the handle's dispatch produced {num_rows}"
        )
    check_hidden(t.shape[1], fp8=False, name=f"hidden size of {name}")
    return t


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype],
    shape: tuple[int, ...],
    device: torch.device,
    contiguous: bool = True,
) -> torch.Tensor:
    """Checks type, dtype, exact shape, device and (optionally) contiguity of one tensor."""
    checked = _check_tensor(
        name, t, dtypes=dtypes, dim=len(shape), device=device, contiguous=contiguous
    )
    if _shape(checked) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {_shape(checked)}")
    return checked


def check_low_latency_shape(
    num_ranks: int,
    num_max_dispatch_tokens_per_rank: int,
    hidden: int,
    num_experts: int,
    num_topk: int,
) -> None:
    """The low-latency limits of every backend: those of the NVLink backend's kernels.

    ``1 <= Nmax <= 65535``, ``H`` a positive multiple of 64 up to 8192, ``1 <= k <= 32``, at most
    32 ranks, and the dispatch kernel's shared memory for ``E`` experts and ``Nmax`` tokens within
    the limit. The reference backend applies them too, so a shape accepted on CPU runs on GPUs.

    Raises:
        ValueError: Naming the limit and the value.
    """
    from ep_core.nvlink import ll

    nmax = num_max_dispatch_tokens_per_rank
    if not 1 <= nmax <= ll.MAX_LL_TOKENS:
        raise ValueError(
            f"num_max_dispatch_tokens_per_rank must be in [1, {ll.MAX_LL_TOKENS}], got {nmax}"
        )
    if hidden <= 0 or hidden % 64 or hidden > ll.MAX_HIDDEN:
        raise ValueError(
            f"low-latency hidden size must be a positive multiple of 64 up to {ll.MAX_HIDDEN}, "
            f"got {hidden}"
        )
    if not 1 <= num_topk <= ll.MAX_TOPK:
        raise ValueError(f"low-latency k must be in [1, {ll.MAX_TOPK}], got {num_topk}")
    if num_ranks > ll.MAX_RANKS:
        raise ValueError(f"the low-latency pair runs on at most {ll.MAX_RANKS} ranks")
    smem = ll.dispatch_smem_bytes(num_ranks, nmax, num_experts)
    if smem > ll.SMEM_LIMIT:
        raise ValueError(
            f"{num_experts} experts x {nmax} tokens need {smem} B of shared memory per CTA "
            f"(limit {ll.SMEM_LIMIT}); use fewer tokens or experts"
        )

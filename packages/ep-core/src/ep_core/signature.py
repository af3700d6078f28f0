"""Per-call signatures: what every rank of one collective call must agree on.

Every dispatch, combine and low-latency call of the reference backend opens with one fixed-size
header exchange (``HEADER_WORDS`` int64 words per peer, the same for every call kind, so a rank in
another call or with other arguments never makes gloo abort on a size mismatch). The header is a
:class:`CallSignature` plus one payload word (a fresh dispatch's token count for that peer). Each
rank compares what it received with :func:`check_signatures`, so every rank raises the same
``ValueError`` naming the argument and the ranks that disagree. A rank that rejected its own input
sends :meth:`CallSignature.abort` instead of leaving its peers waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from ep_jit.agreement import check_agreement
from ep_jit.rows import all_to_all_fixed

__all__ = ["HEADER_WORDS", "CallSignature", "check_signatures", "exchange_header"]

_MAGIC = 0x45505349_00000001
"""First word of every header ("EPSI", version 1): anything else is not a signature."""

ABORT = "abort"
"""Mode of a rank that rejected its own input."""

_MODES = (
    ABORT,
    "dispatch",
    "cached dispatch",
    "combine",
    "low_latency_dispatch",
    "low_latency_combine",
)

_DTYPES: tuple[torch.dtype | None, ...] = (
    None,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float32,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.uint8,
)


def _dtype_code(dtype: torch.dtype | None) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _dtype_name(code: int) -> str:
    if 0 <= code < len(_DTYPES):
        dtype = _DTYPES[code]
        return "none" if dtype is None else str(dtype).removeprefix("torch.")
    return "other"


@dataclass(frozen=True)
class CallSignature:
    """The arguments of one collective call that every rank must give alike.

    Attributes:
        mode: ``"dispatch"``, ``"cached dispatch"``, ``"combine"``, ``"low_latency_dispatch"``,
            ``"low_latency_combine"`` or ``"abort"``.
        sequence: The call's number on this buffer (every call counts, aborted ones too).
        num_experts: ``E``.
        hidden: ``H`` of the data the call moves.
        num_topk: ``k``.
        x_dtype: dtype of the data (``None`` when aborted).
        scales_dtype: dtype of FP8 scales, ``None`` without.
        scales_cols: Scale columns per token (0 without).
        topk_weights: Whether weights travel with the tokens.
        do_cpu_sync: The dispatch's CPU sync flag (the handle's for cached calls).
        num_max_tokens_per_rank: ``Nmax`` of the call.
        expert_alignment: ``A`` (high-throughput dispatch; 0 elsewhere).
        do_expand: Expanded layout.
        num_bias: Bias tensors of a combine.
    """

    mode: str
    sequence: int
    num_experts: int = 0
    hidden: int = 0
    num_topk: int = 0
    x_dtype: torch.dtype | None = None
    scales_dtype: torch.dtype | None = None
    scales_cols: int = 0
    topk_weights: bool = False
    do_cpu_sync: bool = False
    num_max_tokens_per_rank: int = 0
    expert_alignment: int = 0
    do_expand: bool = False
    num_bias: int = 0

    @classmethod
    def abort(cls, sequence: int) -> CallSignature:
        """The signature a rank sends when it rejected its own input."""
        return cls(ABORT, sequence)

    def words(self) -> list[int]:
        """The signature as ``HEADER_WORDS - 1`` int64 words (magic first)."""
        out = [_MAGIC]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "mode":
                out.append(_MODES.index(value))
            elif f.name.endswith("dtype"):
                out.append(_dtype_code(value))
            else:
                out.append(int(value))
        return out

    @staticmethod
    def describe(words: list[int]) -> dict[str, object] | None:
        """Readable field values of received words, ``None`` when they are not a signature."""
        if len(words) != len(_FIELDS) + 1 or words[0] != _MAGIC:
            return None
        out: dict[str, object] = {}
        for name, value in zip(_FIELDS, words[1:], strict=True):
            if name == "mode":
                out[name] = _MODES[value] if 0 <= value < len(_MODES) else f"unknown {value}"
            elif name.endswith("dtype"):
                out[name] = _dtype_name(value)
            else:
                out[name] = value
        return out


_FIELDS = tuple(f.name for f in fields(CallSignature))

HEADER_WORDS = len(_FIELDS) + 2
"""int64 words one rank sends each peer at the start of every call: signature plus one payload."""


def check_signatures(received: list[list[int]], rank: int) -> None:
    """Raises ``ValueError`` unless every rank sent this rank's signature (same on every rank).

    Args:
        received: The signature words each rank sent (by rank, ``HEADER_WORDS - 1`` each).
        rank: This rank (its own words are ``received[rank]``).

    Raises:
        ValueError: A rank rejected its input (``"abort"``), sent something that is not a
            signature, or gave other arguments; the message names the ranks and the argument.
    """
    described = [CallSignature.describe(w) for w in received]
    strangers = [r for r, d in enumerate(described) if d is None]
    if strangers:
        raise ValueError(
            f"rank(s) {strangers} are not in a dispatch/combine call of this buffer while "
            f"rank {rank} is (another collective on the same group, or another buffer)"
        )
    calls = [d for d in described if d is not None]
    aborted = [r for r, d in enumerate(calls) if d["mode"] == ABORT]
    if aborted:
        mine = calls[rank]["mode"]
        raise ValueError(
            f"rank(s) {aborted} rejected their input to this collective call (the error is "
            f"raised on those ranks); rank {rank} ({mine}) fails with them"
        )
    # The mode first: other fields of different call kinds mean nothing side by side.
    modes = [{"mode": d["mode"], "sequence": d["sequence"]} for d in calls]
    check_agreement(modes, f"collective call of rank {rank}")
    check_agreement(
        [{k: v for k, v in d.items() if k not in ("mode", "sequence")} for d in calls],
        f"{calls[rank]['mode']} call",
    )


def exchange_header(
    group: dist.ProcessGroup,
    rank: int,
    signature: CallSignature,
    payload: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """The first exchange of a reference call: signatures (checked) plus one word per peer.

    One equal-split all-to-all of ``[R, HEADER_WORDS]`` int64 on the current stream (bounded by
    :func:`ep_jit.rows.collective_timeout` where it blocks the host). The signatures are read on
    the host and checked, except while a CUDA graph is being captured (nothing may be read on
    the host there; the exchange is still captured, so replays keep the ranks paired).

    Args:
        group: The process group of ``R`` ranks.
        rank: This rank.
        signature: This rank's call signature.
        payload: ``[R]`` integers, word ``d`` sent to rank ``d``; ``None`` sends zeros.
        device: Device of the exchange (the call's tensors').

    Returns:
        ``[R]`` int64: the payload word each rank sent here.

    Raises:
        ValueError: See :func:`check_signatures`.
    """
    num_ranks = group.size()
    words = torch.tensor(signature.words(), dtype=torch.int64, device=device)
    send = torch.empty((num_ranks, HEADER_WORDS), dtype=torch.int64, device=device)
    send[:, :-1] = words
    if payload is None:
        send[:, -1] = 0
    else:
        send[:, -1] = payload.to(torch.int64)
    recv = all_to_all_fixed(send, group)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing:
        check_signatures(recv[:, :-1].tolist(), rank)
    return recv[:, -1]

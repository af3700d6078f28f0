"""Configuration, case list and input generation of ``ep-bench``.

Everything here is shared by the CLI process (which validates the options and enumerates the
cases) and the spawned ranks (which build the routing and the tensors of each case). Inputs are
generated on the rank's device from seeded generators, so every run of the same command line
measures the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "GROUP_LIMITED_NUM_GROUPS",
    "GROUP_LIMITED_TOPK_GROUPS",
    "ROUTINGS",
    "SKEWED_HOT_SHARE",
    "BenchConfig",
    "Case",
    "check_routing",
    "enumerate_cases",
    "make_routing",
    "make_tokens",
    "seeded_generator",
    "tokens_in_rank",
]

ROUTINGS = ("uniform", "skewed", "group-limited")

SKEWED_HOT_SHARE = 0.75
"""Share of tokens that pick the hot expert (expert 0, on rank 0) under ``--routing skewed``."""

_SKEWED_RANK_BOOST = 0.25
"""Score bonus of the hot rank's other experts, so that rank also receives more than its share."""

GROUP_LIMITED_NUM_GROUPS = 8
"""Expert groups of ``--routing group-limited`` (DeepSeek-V3: ``n_group = 8``)."""

GROUP_LIMITED_TOPK_GROUPS = 4
"""Groups each token may pick its experts from (DeepSeek-V3: ``topk_group = 4``)."""


@dataclass(frozen=True)
class BenchConfig:
    """Resolved options of one ``ep-bench`` run; pickled to every rank.

    Attributes:
        modes: ``("ht",)``, ``("ll",)`` or both: high-throughput and low-latency kernels.
        dtypes: Dispatch formats, ``"fp8"`` (e4m3 data + float32 per-128 scales) or ``"bf16"``.
        num_tokens: Tokens per rank of the high-throughput cases.
        hidden: Hidden size ``H``.
        num_topk: Experts per token ``k``.
        num_experts: Experts in total ``E`` (a multiple of the rank count).
        num_sms: SM counts swept by the high-throughput cases; 0 = the analytical default.
        ll_tokens: Tokens per rank of the low-latency cases.
        routing: One of :data:`ROUTINGS`.
        backend: ``backend=`` of the :class:`~ep_elastic.ElasticBuffer` under test.
        iters: Timed calls per measurement (per repeat).
        warmup: Untimed calls before the first repeat.
        repeats: Measurements of ``iters`` calls each per case; the speedup's spread is over them.
        seed: Base seed of every generator.
        world_size: Number of ranks.
        use_gpu: One rank per GPU (NCCL) rather than CPU ranks (gloo).
        result_path: File rank 0 writes its results to, read back by the CLI process.
        defaults: Which defaults filled the options not given: ``"gpu"``, ``"cpu"`` (smaller
            shapes, as a CPU run of the GPU shapes takes many minutes) or ``"quick"``.
    """

    modes: tuple[str, ...]
    dtypes: tuple[str, ...]
    num_tokens: int
    hidden: int
    num_topk: int
    num_experts: int
    num_sms: tuple[int, ...]
    ll_tokens: tuple[int, ...]
    routing: str
    backend: str
    iters: int
    warmup: int
    repeats: int
    seed: int
    world_size: int
    use_gpu: bool
    result_path: str
    defaults: str = "gpu"

    @property
    def num_max_tokens_per_rank(self) -> int:
        """Capacity of the buffers: the largest token count any case uses."""
        sizes = []
        if "ht" in self.modes:
            sizes.append(self.num_tokens)
        if "ll" in self.modes:
            sizes.extend(self.ll_tokens)
        return max(sizes)


@dataclass(frozen=True)
class Case:
    """One step of the sweep: a dispatch and a combine (plus the same-size baseline).

    Attributes:
        mode: ``"ht"`` (``dispatch``/``combine``) or ``"ll"`` (``low_latency_*``).
        dtype: ``"fp8"`` or ``"bf16"``.
        num_sms: SMs requested (high-throughput only; 0 = analytical default).
        num_tokens: Tokens per rank.
    """

    mode: str
    dtype: str
    num_sms: int
    num_tokens: int

    @property
    def label(self) -> str:
        """Short name used in progress lines and JSON, e.g. ``ht/fp8/sms=24/t=4096``."""
        if self.mode == "ht":
            return f"ht/{self.dtype}/sms={self.num_sms}/t={self.num_tokens}"
        return f"ll/{self.dtype}/t={self.num_tokens}"


def enumerate_cases(cfg: BenchConfig) -> list[Case]:
    """All cases of a run, in the order they run (dtype-major, then SM count or token count)."""
    cases: list[Case] = []
    for dtype in cfg.dtypes:
        if "ht" in cfg.modes:
            cases.extend(Case("ht", dtype, sms, cfg.num_tokens) for sms in cfg.num_sms)
        if "ll" in cfg.modes:
            cases.extend(Case("ll", dtype, 0, n) for n in cfg.ll_tokens)
    return cases


def check_routing(routing: str, num_experts: int, num_topk: int) -> None:
    """Raises ``ValueError`` when ``routing`` cannot pick ``num_topk`` of ``num_experts``."""
    if routing not in ROUTINGS:
        raise ValueError(f"--routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    if routing == "group-limited":
        groups, top = GROUP_LIMITED_NUM_GROUPS, GROUP_LIMITED_TOPK_GROUPS
        if num_experts % groups != 0:
            raise ValueError(
                f"--routing group-limited puts the experts in {groups} groups: --num-experts "
                f"{num_experts} is not a multiple of {groups}"
            )
        if num_topk > top * (num_experts // groups):
            raise ValueError(
                f"--routing group-limited picks --num-topk {num_topk} experts inside {top} groups "
                f"of {num_experts // groups}: at most {top * (num_experts // groups)}"
            )


def seeded_generator(device: torch.device, *parts: int) -> torch.Generator:
    """A generator on ``device`` seeded from ``parts`` (e.g. base seed, case, rank, replay)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (1 << 62)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def make_routing(
    routing: str,
    num_tokens: int,
    num_experts: int,
    num_topk: int,
    *,
    num_ranks: int,
    gen: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one rank's routing: distinct experts per token, weights = their gate scores.

    * ``uniform``: scores uniform in ``[0, 1)``, top-k.
    * ``skewed``: as uniform, but expert 0 (on rank 0) is picked by about
      :data:`SKEWED_HOT_SHARE` of the tokens and rank 0's other experts score a bonus
      (``+0.25``), so one expert and one rank receive far more than their share.
    * ``group-limited`` (DeepSeek-V3 gating): experts form :data:`GROUP_LIMITED_NUM_GROUPS`
      contiguous groups scored by the sum of their best two experts; each token keeps its
      :data:`GROUP_LIMITED_TOPK_GROUPS` best groups and takes its top-k inside them.

    Args:
        routing: One of :data:`ROUTINGS`.
        num_tokens: Tokens ``T`` on this rank.
        num_experts: Experts ``E``.
        num_topk: ``k``.
        num_ranks: Ranks ``R`` (the hot rank's experts are the first ``E // R``).
        gen: Generator on ``device``.
        device: Where the tensors are made.

    Returns:
        ``topk_idx`` ``[T, k]`` int64 and ``topk_weights`` ``[T, k]`` float32, on ``device``.
    """
    scores = torch.rand(num_tokens, num_experts, generator=gen, device=device)
    if routing == "skewed":
        num_local = num_experts // num_ranks
        scores[:, 1:num_local] += _SKEWED_RANK_BOOST
        hot = torch.rand(num_tokens, generator=gen, device=device) < SKEWED_HOT_SHARE
        scores[:, 0] = torch.where(hot, torch.full_like(scores[:, 0], 2.0), scores[:, 0])
    elif routing == "group-limited":
        groups = GROUP_LIMITED_NUM_GROUPS
        per_group = num_experts // groups
        grouped = scores.view(num_tokens, groups, per_group)
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        keep = group_scores.topk(GROUP_LIMITED_TOPK_GROUPS, dim=-1).indices
        mask = torch.zeros(num_tokens, groups, dtype=torch.bool, device=device)
        mask.scatter_(1, keep, True)
        scores = scores.masked_fill(~mask.repeat_interleave(per_group, dim=1), -1.0)
    weights, idx = scores.topk(num_topk, dim=-1)
    return idx.to(torch.int64).contiguous(), weights.float().contiguous()


def make_tokens(
    num_tokens: int, hidden: int, *, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Random activations ``[num_tokens, hidden]`` bfloat16 on ``device`` (standard normal)."""
    x = torch.randn(num_tokens, hidden, generator=gen, device=device, dtype=torch.float32)
    return x.to(torch.bfloat16)


def tokens_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """``[T, R]`` bool: token ``t`` has at least one expert on rank ``d`` (``-1`` slots ignored)."""
    num_local = num_experts // num_ranks
    owner = torch.where(topk_idx >= 0, topk_idx // num_local, torch.full_like(topk_idx, num_ranks))
    in_rank = torch.zeros(
        topk_idx.shape[0], num_ranks + 1, dtype=torch.bool, device=topk_idx.device
    )
    in_rank.scatter_(1, owner, True)
    return in_rank[:, :num_ranks]

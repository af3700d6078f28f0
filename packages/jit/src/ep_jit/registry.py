"""Backends of every primitive, discovered by entry point, and the one rule for ``"auto"``.

Packages declare a provider in their ``pyproject.toml``::

    [project.entry-points."ep_jit.backends"]
    ep_core = "ep_core.factory:ep_backends"

where ``ep_backends()`` returns :class:`BackendSpec` instances, for example the ``"torch"``
reference backend and the ``"nvlink"`` kernel backend of primitive ``"ep"``. A spec names its
factory as ``"module:attribute"``, imported only when the backend is built, so discovering and
selecting backends never imports a kernel module, initialises CUDA or compiles.

:func:`select_backend` turns a requested name into a spec: ``"auto"`` takes the highest-priority
backend that can serve the group (and logs that choice once per process); an explicit name must
be registered and able to serve. :func:`get_backend` looks a name up without checking, for
building a backend already selected.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ep_jit._log import debug_enabled, logger, verbose

if TYPE_CHECKING:
    import torch.distributed as dist

__all__ = [
    "AUTO",
    "ENTRY_POINT_GROUP",
    "BackendSpec",
    "Provider",
    "UnavailableFn",
    "get_backend",
    "peer_access_unavailable",
    "registered_backends",
    "select_backend",
]

ENTRY_POINT_GROUP = "ep_jit.backends"
AUTO = "auto"
"""The requested name that means "the best backend that can serve"."""

UnavailableFn = Callable[["dist.ProcessGroup", bool], "str | None"]
"""``unavailable(group, all_cuda)``: why a backend cannot serve, or ``None`` when it can."""
Provider = Callable[[], Sequence["BackendSpec"]]
"""A provider: called without arguments, returns the specs of one package."""

_logged_choices: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class BackendSpec:
    """One backend of one primitive, as a provider describes it.

    Attributes:
        primitive: The primitive it implements, e.g. ``"ep"``.
        name: The name users request, e.g. ``"nvlink"``; never ``"auto"``.
        priority: ``"auto"`` prefers higher values; ties are broken by name.
        factory: ``"module:attribute"`` (dotted attributes allowed, e.g.
            ``"ep_core.nvlink:NvlinkBackend.from_config"``), imported on first :meth:`build`;
            or a callable. It is called with :meth:`build`'s arguments.
        unavailable: ``unavailable(group, all_cuda)`` returns why the backend cannot serve the
            process group ``group`` (``all_cuda``: every rank uses a CUDA device, agreed across
            ranks), or ``None`` when it can. It may be collective on ``group``: it is called on
            every rank with the same arguments, in the same order. ``None`` means it can always
            serve.
        description: One line for listings and logs.
    """

    primitive: str
    name: str
    priority: int
    factory: str | Callable[..., Any]
    unavailable: UnavailableFn | None = None
    description: str = ""

    def __post_init__(self) -> None:
        for field in ("primitive", "name"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"BackendSpec.{field} must be a non-empty str, got {value!r}")
        if self.name == AUTO:
            raise ValueError(f"BackendSpec.name {AUTO!r} is reserved (primitive {self.primitive})")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise TypeError(f"BackendSpec.priority must be an int, got {self.priority!r}")
        if isinstance(self.factory, str):
            _split_target(self.factory, "backend factory")
        elif not callable(self.factory):
            raise TypeError(
                f"BackendSpec.factory must be 'module:attr' or callable, got {self.factory!r}"
            )

    @property
    def key(self) -> str:
        """``"primitive/name"``, for messages."""
        return f"{self.primitive}/{self.name}"

    def unavailable_reason(self, group: dist.ProcessGroup, all_cuda: bool) -> str | None:
        """Why this backend cannot serve ``group``, or ``None`` when it can.

        Collective when the spec's check is; an exception of the check becomes the reason, so
        that a rank whose check fails still takes part in the checks that follow.
        """
        if self.unavailable is None:
            return None
        try:
            return self.unavailable(group, all_cuda)
        except Exception as exc:
            logger.debug("availability check of %s raised", self.key, exc_info=True)
            return f"its availability check raised {type(exc).__name__}: {exc}"

    def load_factory(self) -> Callable[..., Any]:
        """The factory, importing its module if it is named by a string.

        Raises:
            ValueError: The factory's module or attribute cannot be imported (chained).
            TypeError: The named object is not callable.
        """
        if not isinstance(self.factory, str):
            return self.factory
        try:
            obj = _import_target(self.factory, "backend factory")
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                f"backend {self.key} cannot be built: {self.factory} is missing ({exc})"
            ) from exc
        return obj

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """Imports the factory (first time only) and calls it with these arguments."""
        return self.load_factory()(*args, **kwargs)


def peer_access_unavailable(group: dist.ProcessGroup, all_cuda: bool) -> str | None:
    """Why the ranks of ``group`` cannot reach each other's GPU memory, or ``None`` when they can.

    The condition every peer-memory backend shares (kernels on peer-mapped memory, copy-engine
    copies between ranks): every rank on a CUDA device, all on one host with peer access between
    their GPUs (one NVLink domain, or ranks sharing one GPU). Collective when ``all_cuda``; use as
    (or inside) a :class:`BackendSpec`'s ``unavailable``.
    """
    if not all_cuda:
        return "not every rank is on a CUDA device"
    from ep_jit.symm import is_single_nvlink_domain

    if not is_single_nvlink_domain(group):
        return "the ranks are not on one host with peer access between their GPUs"
    return None


def _split_target(target: str, what: str) -> tuple[str, str]:
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{what} must read 'module:attribute', got {target!r}")
    return module, attr


def _import_target(target: str, what: str) -> Callable[..., Any]:
    module, attr = _split_target(target, what)
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{what} {target!r} is not callable")
    result: Callable[..., Any] = obj
    return result


def _all_specs(providers: Sequence[tuple[str, str | Provider]]) -> list[tuple[str, BackendSpec]]:
    """``(provider name, spec)`` from entry points, then ``providers``; a name seen twice is used
    once."""
    installed = [
        (ep.name, ep.value) for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    ]
    found: list[tuple[str, str | Provider, bool]] = [(n, v, True) for n, v in installed]
    found += [(name, provider, False) for name, provider in providers]
    seen: set[str] = set()
    specs: list[tuple[str, BackendSpec]] = []
    for name, provider, from_entry_point in found:
        if name in seen:
            continue
        try:
            if isinstance(provider, str):
                fn = _import_target(provider, "backend provider")
            else:
                fn = provider
            provided = list(fn())
        except Exception as exc:
            if not from_entry_point:
                raise
            # Another installed package that is broken must not break this one's backends: skip
            # it (its own callers still see the error, through their explicit provider).
            _warn_broken(name, exc)
            continue
        seen.add(name)
        for spec in provided:
            if not isinstance(spec, BackendSpec):
                raise TypeError(f"backend provider {name} returned {type(spec).__name__}")
            specs.append((name, spec))
    return specs


_warned_providers: set[str] = set()


def _warn_broken(name: str, exc: Exception) -> None:
    if name not in _warned_providers:
        _warned_providers.add(name)
        logger.warning(
            "backend provider %r (entry point of group %s) failed and is skipped: %s: %s",
            name,
            ENTRY_POINT_GROUP,
            type(exc).__name__,
            exc,
        )


def registered_backends(
    primitive: str, providers: Sequence[tuple[str, str | Provider]] = ()
) -> list[BackendSpec]:
    """The backends of ``primitive``, in the order ``"auto"`` evaluates them.

    That order is by priority, highest first, then by name, so it is the same on every rank that
    has the same packages installed.

    Args:
        primitive: E.g. ``"ep"``.
        providers: ``(name, provider)`` pairs added to the ``ep_jit.backends`` entry points,
            ``provider`` a ``"module:function"`` string or a callable. Packages pass their own
            provider here so that source checkouts run from ``PYTHONPATH`` (no entry points)
            work too. A provider name already seen is skipped.

    Raises:
        ValueError: Two providers register the same backend name for ``primitive``.
        TypeError: A provider returned something other than :class:`BackendSpec` instances.
    """
    owners: dict[str, str] = {}
    specs: list[BackendSpec] = []
    for provider, spec in _all_specs(providers):
        if spec.primitive != primitive:
            continue
        if spec.name in owners:
            raise ValueError(
                f"backend {spec.key} is registered by both {owners[spec.name]} and {provider}"
            )
        owners[spec.name] = provider
        specs.append(spec)
    specs.sort(key=lambda s: (-s.priority, s.name))
    return specs


def _known(primitive: str, specs: Sequence[BackendSpec]) -> list[BackendSpec]:
    if not specs:
        raise ValueError(f"no backends are registered for primitive {primitive!r}")
    return list(specs)


def get_backend(
    primitive: str, name: str, providers: Sequence[tuple[str, str | Provider]] = ()
) -> BackendSpec:
    """The registered backend ``name`` of ``primitive``, without checking that it can serve.

    Raises:
        ValueError: ``name`` is not registered (the message lists the names that are).
    """
    specs = _known(primitive, registered_backends(primitive, providers))
    for spec in specs:
        if spec.name == name:
            return spec
    choices = tuple(sorted([AUTO, *(s.name for s in specs)]))
    raise ValueError(f"{primitive} backend must be one of {choices}, got {name!r}")


def select_backend(
    primitive: str,
    requested: str,
    group: dist.ProcessGroup,
    all_cuda: bool,
    providers: Sequence[tuple[str, str | Provider]] = (),
) -> BackendSpec:
    """The backend of ``primitive`` that serves ``group`` for the ``requested`` name.

    ``"auto"`` checks every registered backend, in :func:`registered_backends` order, and takes
    the first (highest-priority) that can serve; the choice is logged once per process (at INFO
    on the ``ep_jit`` logger, on stderr when ``EP_JIT_DEBUG`` is on). Any other name checks only
    that backend.

    Collective: availability checks may run collectives on ``group``, so every rank must call
    this with the same ``requested`` and ``all_cuda``. ``"auto"`` evaluates every backend even
    after finding one, so ranks whose checks disagree still run the same collectives in the same
    order; they then return different specs, which callers must compare across ranks.

    Args:
        primitive: E.g. ``"ep"``.
        requested: ``"auto"`` or a registered name.
        group: The process group the backend will serve.
        all_cuda: Every rank of ``group`` uses a CUDA device (agreed across ranks).
        providers: Extra providers, as for :func:`registered_backends`.

    Raises:
        ValueError: ``requested`` is not registered (the message lists the names that are), the
            named backend cannot serve ``group`` (with why), or, for ``"auto"``, none can.
    """
    if requested != AUTO:
        spec = get_backend(primitive, requested, providers)
        reason = spec.unavailable_reason(group, all_cuda)
        if reason is not None:
            raise ValueError(f"{primitive} backend={requested!r} cannot be used: {reason}")
        return spec
    specs = _known(primitive, registered_backends(primitive, providers))
    # No early exit: every rank runs every check, whatever its own checks answered.
    reasons = [(spec, spec.unavailable_reason(group, all_cuda)) for spec in specs]
    passed_over: list[str] = []
    for spec, reason in reasons:
        if reason is None:
            _log_choice(spec, passed_over)
            return spec
        passed_over.append(f"{spec.name}: {reason}")
    raise ValueError(f"no {primitive} backend can serve this group ({'; '.join(passed_over)})")


def _log_choice(chosen: BackendSpec, passed_over: Sequence[str]) -> None:
    """Logs ``"auto"``'s choice, once per process for each (primitive, backend)."""
    key = (chosen.primitive, chosen.name)
    if key in _logged_choices:
        return
    _logged_choices.add(key)
    why = f" (passed over {'; '.join(passed_over)})" if passed_over else ""
    if debug_enabled():
        verbose("%s backend 'auto' chose %r%s", chosen.primitive, chosen.name, why)
    else:
        logger.info("%s backend 'auto' chose %r%s", chosen.primitive, chosen.name, why)

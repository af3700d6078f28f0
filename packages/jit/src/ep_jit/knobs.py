"""Environment knobs: every environment variable of ep-jit, declared once.

Start here to see what can be configured. Each knob is a typed descriptor that reads the
environment at access time, so a value exported after import still takes effect::

    from ep_jit import knobs

    knobs.jit.cache_dir  # str, read from EP_JIT_CACHE_DIR now
    knobs.jit.debug = True  # sets os.environ["EP_JIT_DEBUG"] = "1" (inherited by children)
    with knobs.jit.scope():  # restores every EP_JIT_* variable on exit
        ...

The machinery is shared by the other packages: they declare their own ``KnobGroup`` subclass with
``knob_bool``/``knob_int``/``knob_str``/``knob_choice`` in their ``knobs.py``. Every knob lands in
one registry, which ``describe()`` lists for generated documentation. Nothing outside a
``knobs.py`` reads ``os.environ``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

__all__ = [
    "EnvKnob",
    "JitKnobs",
    "KnobGroup",
    "KnobInfo",
    "TorchrunEnv",
    "cuda_home_candidates",
    "describe",
    "jit",
    "knob_bool",
    "knob_choice",
    "knob_int",
    "knob_opt_str",
    "knob_str",
    "markdown_table",
    "torchrun_env",
]

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "n", ""})
_REGISTRY: dict[str, EnvKnob[Any]] = {}


@dataclass(frozen=True)
class KnobInfo:
    """One row of the knob table, as returned by :func:`describe`."""

    name: str
    type: str
    default: str
    doc: str
    owner: str


# os.environ keeps its encoded contents in a dict; a lookup there skips the str<->bytes
# round trip of os.environ.get (0.6 us), which matters for knobs read on launch paths. Assignments
# through os.environ (and putenv-free changes made by knobs) update that dict, so a knob still
# reads the live environment.
_ENV_DATA: Any = getattr(os.environ, "_data", None)
_ENCODE_KEY: Any = getattr(os.environ, "encodekey", None)
_DECODE_VALUE: Any = getattr(os.environ, "decodevalue", None)


class EnvKnob(Generic[T]):
    """A typed environment variable, read at access time.

    Used as a class attribute of a :class:`KnobGroup`: reading the attribute parses the variable
    (or returns the default when unset or empty), assigning sets ``os.environ`` (``None`` unsets).

    Args:
        name: The environment variable, e.g. ``"EP_JIT_DEBUG"``.
        default: The value when unset, or a zero-argument callable computing it at access time.
        doc: One line for the documentation table.
        parse: Turns the raw string into a value; raises ``ValueError`` for a bad string.
        type_name: Type shown in the documentation table.
        default_doc: How the default is shown when it is computed by a callable.
        owner: Package declaring the knob (defaults to the declaring module's top package).
    """

    def __init__(
        self,
        name: str,
        default: T | Callable[[], T],
        doc: str,
        *,
        parse: Callable[[str], T],
        type_name: str,
        default_doc: str | None = None,
        owner: str | None = None,
    ) -> None:
        """Declares and registers the knob (see the class docstring)."""
        if not name or not name.replace("_", "").isalnum() or not name.isupper():
            raise ValueError(f"knob name must be an upper-case identifier, got {name!r}")
        self.name = name
        self.doc = doc
        self.type_name = type_name
        self._default = default
        self._parse = parse
        fast = _ENV_DATA is not None and _ENCODE_KEY is not None and _DECODE_VALUE is not None
        self._key: Any = _ENCODE_KEY(name) if fast else None
        self._memo: tuple[Any, T] | None = None  # (raw encoded value, parsed value)
        self.default_doc = default_doc if default_doc is not None else repr(default)
        self.owner = owner or ""
        previous = _REGISTRY.get(name)
        if previous is not None and (previous.type_name, previous.doc) != (type_name, doc):
            raise ValueError(f"environment knob {name} is declared twice with different meanings")
        _REGISTRY[name] = self

    def __set_name__(self, owner: type, attr: str) -> None:
        """Records the declaring package when the knob is a class attribute."""
        if not self.owner:
            self.owner = owner.__module__.split(".")[0]

    def default(self) -> T:
        """Returns the default value (computing it when it is a callable)."""
        if callable(self._default):
            return self._default()
        return self._default

    def is_set(self) -> bool:
        """Whether the variable is present and non-empty in the environment."""
        return bool(os.environ.get(self.name, ""))

    def get(self) -> T:
        """Parses the current value of the variable, or returns the default.

        Raises:
            ValueError: The variable holds a string this knob cannot parse.
        """
        if self._key is not None:
            encoded = _ENV_DATA.get(self._key)
            if not encoded:
                return self.default()
            memo = self._memo
            if memo is not None and memo[0] == encoded:
                return memo[1]
            raw = _DECODE_VALUE(encoded)
        else:
            raw = os.environ.get(self.name, "")
            if raw == "":
                return self.default()
        try:
            value = self._parse(raw)
        except ValueError as exc:
            raise ValueError(
                f"bad value {raw!r} for environment variable {self.name}: {exc}"
            ) from exc
        if self._key is not None:
            self._memo = (encoded, value)
        return value

    def set(self, value: T | None) -> None:
        """Writes ``value`` into ``os.environ`` (``None`` removes the variable)."""
        if value is None:
            os.environ.pop(self.name, None)
        elif isinstance(value, bool):
            os.environ[self.name] = "1" if value else "0"
        else:
            os.environ[self.name] = str(value)

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> EnvKnob[T]: ...
    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> T: ...
    def __get__(self, obj: object | None, objtype: type | None = None) -> T | EnvKnob[T]:
        """The value on an instance; the knob itself on the class."""
        return self if obj is None else self.get()

    def __set__(self, obj: object, value: T | None) -> None:
        """Sets (or with ``None`` removes) the environment variable."""
        self.set(value)

    def __repr__(self) -> str:
        """Name, type and default."""
        return f"EnvKnob({self.name}: {self.type_name} = {self.default_doc})"


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def knob_bool(name: str, default: bool, doc: str) -> EnvKnob[bool]:
    """Declares a boolean knob (``1/true/yes/on`` or ``0/false/no/off``)."""
    return EnvKnob(name, default, doc, parse=_parse_bool, type_name="bool")


def knob_int(name: str, default: int, doc: str) -> EnvKnob[int]:
    """Declares an integer knob (any literal ``int()`` accepts, e.g. ``0x10``)."""
    return EnvKnob(name, default, doc, parse=lambda raw: int(raw.strip(), 0), type_name="int")


def knob_str(
    name: str, default: str | Callable[[], str], doc: str, *, default_doc: str | None = None
) -> EnvKnob[str]:
    """Declares a string knob; ``default`` may be computed at access time by a callable."""
    return EnvKnob(name, default, doc, parse=str, type_name="str", default_doc=default_doc)


def knob_opt_str(name: str, doc: str) -> EnvKnob[str | None]:
    """Declares a string knob that is ``None`` when unset."""
    return EnvKnob(name, None, doc, parse=str, type_name="str | None", default_doc="unset")


def knob_choice(name: str, default: str, choices: tuple[str, ...], doc: str) -> EnvKnob[str]:
    """Declares a string knob restricted to ``choices`` (compared case-insensitively)."""
    if default not in choices:
        raise ValueError(f"default {default!r} of {name} is not one of {choices}")

    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return EnvKnob(name, default, doc, parse=parse, type_name="|".join(choices))


class KnobGroup:
    """Base class of a namespace of knobs; subclass it and add ``EnvKnob`` class attributes."""

    @classmethod
    def knobs(cls) -> list[EnvKnob[Any]]:
        """The knobs of this group, in declaration order."""
        return [v for v in vars(cls).values() if isinstance(v, EnvKnob)]

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Restores every variable of this group to its value at entry when the block exits."""
        saved = {k.name: os.environ.get(k.name) for k in self.knobs()}
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def describe(owner: str | None = None) -> list[KnobInfo]:
    """Lists every declared knob (of every imported package), sorted by name.

    Args:
        owner: Only knobs declared by this package (e.g. ``"ep_jit"``); ``None`` lists all.
    """
    rows = [
        KnobInfo(k.name, k.type_name, k.default_doc, k.doc, k.owner)
        for k in _REGISTRY.values()
        if owner is None or k.owner == owner
    ]
    return sorted(rows, key=lambda r: r.name)


def markdown_table(owner: str | None = None) -> str:
    """Renders :func:`describe` as a Markdown table (for generated docs and READMEs)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for r in describe(owner):
        lines.append(f"| `{r.name}` | {cell(r.type)} | `{cell(r.default)}` | {cell(r.doc)} |")
    return "\n".join(lines)


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ep-jit")


class JitKnobs(KnobGroup):
    """The knobs of ep-jit (``EP_JIT_*``, plus ``EP_AVOID_RECORD_STREAM`` and ``CUDA_*``)."""

    cache_dir = knob_str(
        "EP_JIT_CACHE_DIR",
        _default_cache_dir,
        "Root of the on-disk kernel cache.",
        default_doc="$XDG_CACHE_HOME/ep-jit or ~/.cache/ep-jit",
    )
    debug = knob_bool("EP_JIT_DEBUG", False, "Log generated sources, compiles and launches.")
    print_compiler_command = knob_bool(
        "EP_JIT_PRINT_COMPILER_COMMAND", False, "Log every compiler command or NVRTC options."
    )
    ptxas_verbose = knob_bool(
        "EP_JIT_PTXAS_VERBOSE", False, "Pass -v to ptxas and log its register/spill report."
    )
    ptxas_check = knob_bool(
        "EP_JIT_PTXAS_CHECK", False, "Fail a compile whose kernels use local memory or spill."
    )
    with_lineinfo = knob_bool(
        "EP_JIT_WITH_LINEINFO", False, "Compile with -lineinfo (source lines in profilers)."
    )
    dump_ptx = knob_bool("EP_JIT_DUMP_PTX", False, "Write kernel.ptx next to each new cubin.")
    dump_sass = knob_bool(
        "EP_JIT_DUMP_SASS", False, "Write kernel.sass (cuobjdump --dump-sass) next to new cubins."
    )
    nvcc_compiler = knob_opt_str(
        "EP_JIT_NVCC_COMPILER", "Path of nvcc (default: CUDA_HOME/bin/nvcc, then PATH)."
    )
    compiler = knob_choice(
        "EP_JIT_COMPILER", "nvrtc", ("nvrtc", "nvcc"), "Compiler used for kernels."
    )
    arch = knob_opt_str(
        "EP_JIT_ARCH", "Target architecture, e.g. 90a (default: the current device's)."
    )
    peer_memory = knob_choice(
        "EP_JIT_PEER_MEMORY",
        "auto",
        ("auto", "vmm", "torch"),
        "Peer memory path: vmm (driver virtual memory, shared by file descriptor), torch "
        "(torch symmetric memory), auto (torch for one GPU per rank, else vmm).",
    )
    ranks_per_node = knob_int(
        "EP_JIT_RANKS_PER_NODE",
        0,
        "Simulated nodes of this many consecutive ranks in ep_jit.topology (0: real hosts).",
    )
    host_timeout_s = knob_int(
        "EP_JIT_HOST_TIMEOUT_S",
        300,
        "Default limit in seconds of host waits (stream syncs, handle exchange, destroy).",
    )
    # DeepEP's name, read by ep_jit.streams for every package's comm-stream calls.
    avoid_record_stream = knob_bool(
        "EP_AVOID_RECORD_STREAM",
        False,
        "Keep async operands alive in the returned EventOverlap instead of calling record_stream.",
    )
    cuda_home = knob_opt_str("CUDA_HOME", "CUDA toolkit root (headers, nvcc); read by ep-jit.")
    cuda_path = knob_opt_str("CUDA_PATH", "Fallback for CUDA_HOME; read by ep-jit.")


jit = JitKnobs()


def cuda_home_candidates() -> list[str]:
    """CUDA toolkit roots named by the environment, in priority order (may be empty)."""
    return [p for p in (jit.cuda_home, jit.cuda_path) if p]


@dataclass(frozen=True)
class TorchrunEnv:
    """The process layout torchrun (or any launcher using its variables) exported."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int


def torchrun_env() -> TorchrunEnv | None:
    """Reads torchrun's variables; ``None`` when ``RANK``/``WORLD_SIZE`` are not set.

    Raises:
        ValueError: A variable is present but not an integer, or ``MASTER_ADDR``/``MASTER_PORT``
            is missing while ``RANK`` is set.
    """
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        raise ValueError(f"RANK is set but {', '.join(missing)} is not")

    def num(var: str, fallback: int) -> int:
        raw = env.get(var)
        if raw is None or raw == "":
            return fallback
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"environment variable {var}={raw!r} is not an integer") from None

    rank, world = num("RANK", 0), num("WORLD_SIZE", 1)
    local_world = num("LOCAL_WORLD_SIZE", world)
    return TorchrunEnv(
        rank=rank,
        world_size=world,
        local_rank=num("LOCAL_RANK", rank % max(local_world, 1)),
        local_world_size=local_world,
        node_rank=num("GROUP_RANK", rank // max(local_world, 1)),
        master_addr=env["MASTER_ADDR"],
        master_port=num("MASTER_PORT", 0),
    )

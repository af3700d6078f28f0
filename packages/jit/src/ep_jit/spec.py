"""``KernelSpec``: what to compile, rendered into one small generated translation unit.

A package keeps its device code in headers (``include/<pkg>/*.cuh``) as a ``__device__``
function template. A ``KernelSpec`` names the header, the template and its compile-time constants;
:meth:`KernelSpec.render` emits the only generated C++ there is::

    // ep-jit 0.1.0 generated source for kernel 'ep_core_dispatch'
    #define EP_NUM_TOPK_IDX_BITS 8              (from defines)
    #include <ep_core/sm90_dispatch.cuh>        (from includes)

    // kNumRanks = 8, kHidden = 7168            (from constants, in order)
    extern "C" __global__ void __launch_bounds__(512, 1)
    ep_core_dispatch(const void* x, int num_tokens) {
      ep_core::dispatch_impl<8, 7168>(x, num_tokens);
    }

The same text compiles with NVRTC and nvcc; the parameter list also drives argument marshalling
at launch (see :mod:`ep_jit.launch`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

from ep_jit._version import __version__

__all__ = ["Constant", "KernelSpec", "param_names"]

Constant = Union[bool, int, str]  # noqa: UP007  (runtime alias kept valid on Python 3.10)
"""A template argument: ``bool`` and ``int`` are emitted as literals, ``str`` verbatim (a type
name such as ``"__nv_bfloat16"`` or an expression such as ``"Mode::kFast"``)."""

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUALIFIED = re.compile(r"^(::)?[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*$")
_PARAM_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*$")
_INCLUDE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*\.(cuh|h|hpp)$")


def param_names(params: Sequence[str]) -> list[str]:
    """The identifier at the end of each C++ parameter declaration.

    Raises:
        ValueError: A declaration does not end with a parameter name.
    """
    names = []
    for p in params:
        m = _PARAM_NAME.search(p)
        if m is None or m.start() == 0:
            raise ValueError(f"kernel parameter {p!r} must read '<type> <name>'")
        names.append(m.group(1))
    if len(set(names)) != len(names):
        raise ValueError(f"kernel parameter names repeat: {names}")
    return names


def _literal(name: str, value: Constant) -> str:
    # bool first: bool is an int subclass.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 64):
            raise ValueError(f"constant {name}={value} does not fit in 64 bits")
        if value >= (1 << 63):
            return f"{value}ull"
        return f"{value}ll" if not -(1 << 31) <= value < (1 << 31) else str(value)
    if isinstance(value, str):
        if not value.strip() or any(c in value for c in ";{}\n#"):
            raise ValueError(f"constant {name}={value!r} is not a C++ type or expression")
        return value
    raise TypeError(f"constant {name} must be bool, int or str, got {type(value).__name__}")


@dataclass(frozen=True, init=False)
class KernelSpec:
    """One kernel instantiation: headers, a device template, its constants and the parameters.

    Instances are hashable and compare by value, so they key caches directly.

    Args:
        name: Identifier of the kernel (cache folder names, logs); also the default entry name.
        includes: Headers to include, as written inside ``<...>``, e.g. ``"ep_core/x.cuh"``.
        template: The device function (template) the entry calls, e.g. ``"ep_core::dispatch"``.
        params: C++ parameter declarations of the entry, e.g. ``("const float* x", "int n")``.
            Pointers take tensors, ints or ``None`` at launch; scalars take Python numbers;
            anything else takes a ``ctypes.Structure`` passed by value.
        constants: Template arguments in order, ``{"kNumRanks": 8, "kUseFp8": True}``. Names
            document the generated source; values are bool, int or a C++ type/expression.
        entry: The ``extern "C"`` symbol; defaults to ``name``.
        launch_bounds: ``max_threads`` or ``(max_threads, min_blocks_per_sm)``.
        defines: ``#define`` lines emitted before the includes (``None`` value: no value).
        extra_flags: Extra compiler flags understood by both NVRTC and nvcc (``-D``, ``-U``,
            ``--maxrregcount=N``); they are part of the cache key.
    """

    name: str
    includes: tuple[str, ...]
    template: str
    params: tuple[str, ...] = ()
    constants: tuple[tuple[str, Constant], ...] = field(default=())
    entry: str = ""
    launch_bounds: int | tuple[int, int] | None = None
    defines: tuple[tuple[str, str | int | None], ...] = field(default=())
    extra_flags: tuple[str, ...] = ()

    def __init__(
        self,
        name: str,
        includes: Sequence[str],
        template: str,
        params: Sequence[str] = (),
        constants: Mapping[str, Constant] | Sequence[tuple[str, Constant]] = (),
        entry: str | None = None,
        launch_bounds: int | tuple[int, int] | None = None,
        defines: Mapping[str, str | int | None] | Sequence[tuple[str, str | int | None]] = (),
        extra_flags: Sequence[str] = (),
    ) -> None:
        """Normalises sequences and mappings to tuples and validates (see the class docstring)."""
        if isinstance(includes, str) or isinstance(params, str):
            raise TypeError("includes and params must be sequences of strings, not one string")
        consts = tuple(constants.items() if isinstance(constants, Mapping) else constants)
        defs = tuple(defines.items() if isinstance(defines, Mapping) else defines)
        sets = object.__setattr__
        sets(self, "name", name)
        sets(self, "includes", tuple(includes))
        sets(self, "template", template)
        sets(self, "params", tuple(params))
        sets(self, "constants", consts)
        sets(self, "entry", entry or name)
        sets(self, "launch_bounds", launch_bounds)
        sets(self, "defines", defs)
        sets(self, "extra_flags", tuple(extra_flags))
        self._validate()

    def _validate(self) -> None:
        for label, ident in (("name", self.name), ("entry", self.entry)):
            if not isinstance(ident, str) or not _IDENT.match(ident):
                raise ValueError(f"KernelSpec {label} must be a C identifier, got {ident!r}")
        if not _QUALIFIED.match(self.template):
            raise ValueError(f"KernelSpec template must be a (qualified) name: {self.template!r}")
        if not self.includes:
            raise ValueError(f"KernelSpec {self.name!r} includes no header")
        for inc in self.includes:
            if not _INCLUDE.match(inc) or ".." in inc.split("/"):
                raise ValueError(f"include {inc!r} must look like 'pkg/name.cuh'")
        param_names(self.params)
        for key, value in self.constants:
            if not _IDENT.match(key):
                raise ValueError(f"constant name {key!r} is not an identifier")
            _literal(key, value)
        for key, dvalue in self.defines:
            if not _IDENT.match(key):
                raise ValueError(f"define name {key!r} is not an identifier")
            if isinstance(dvalue, str) and "\n" in dvalue:
                raise ValueError(f"define {key} spans lines")
        lb = self.launch_bounds
        ok = lb is None or (isinstance(lb, int) and lb > 0)
        ok = ok or (isinstance(lb, tuple) and len(lb) == 2 and all(int(v) > 0 for v in lb))
        if not ok:
            raise ValueError(f"launch_bounds must be a positive int or a pair, got {lb!r}")
        for flag in self.extra_flags:
            if not flag.startswith("-"):
                raise ValueError(f"extra flag {flag!r} must start with '-'")

    def with_constants(self, **constants: Constant) -> KernelSpec:
        """A copy with some constants replaced (keeps their order; new names are appended)."""
        merged = dict(self.constants)
        merged.update(constants)
        return KernelSpec(
            name=self.name,
            includes=self.includes,
            template=self.template,
            params=self.params,
            constants=merged,
            entry=self.entry,
            launch_bounds=self.launch_bounds,
            defines=self.defines,
            extra_flags=self.extra_flags,
        )

    def render(self) -> str:
        """The generated translation unit (deterministic: equal specs give equal text)."""
        lines = [f"// ep-jit {__version__} generated source for kernel '{self.name}'"]
        for key, value in self.defines:
            lines.append(f"#define {key}" if value is None else f"#define {key} {value}")
        lines += [f"#include <{inc}>" for inc in self.includes]
        lines.append("")
        targs = ", ".join(_literal(k, v) for k, v in self.constants)
        if self.constants:
            described = ", ".join(f"{k} = {_literal(k, v)}" for k, v in self.constants)
            lines.append(f"// {described}")
        bounds = ""
        if self.launch_bounds is not None:
            lb = self.launch_bounds
            bounds = (
                f"__launch_bounds__({lb}) "
                if isinstance(lb, int)
                else (f"__launch_bounds__({lb[0]}, {lb[1]}) ")
            )
        call = f"{self.template}<{targs}>" if self.constants else self.template
        args = ", ".join(param_names(self.params))
        lines.append(
            f'extern "C" __global__ void {bounds}{self.entry}({", ".join(self.params)}) {{'
        )
        lines.append(f"  {call}({args});")
        lines.append("}")
        return "\n".join(lines) + "\n"

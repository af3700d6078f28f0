"""Launch-argument packing of :class:`ep_jit.Kernel`: C++ parameter kinds and ctypes storage.

Each kernel parameter is a pointer, a scalar (range-checked against its C type) or a by-value
struct; :class:`_Packer` checks a launch's arguments and writes them into preallocated ctypes
storage whose ``void*[]`` array ``cuLaunchKernel`` reads.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from typing import Any

import torch

from ep_jit.spec import KernelSpec, param_names

_SCALARS: dict[str, type[Any]] = {
    "bool": ctypes.c_bool,
    "char": ctypes.c_char,
    "int8_t": ctypes.c_int8,
    "uint8_t": ctypes.c_uint8,
    "int16_t": ctypes.c_int16,
    "uint16_t": ctypes.c_uint16,
    "short": ctypes.c_int16,
    "int": ctypes.c_int32,
    "int32_t": ctypes.c_int32,
    "unsigned": ctypes.c_uint32,
    "unsigned int": ctypes.c_uint32,
    "uint32_t": ctypes.c_uint32,
    "long": ctypes.c_int64,
    "long long": ctypes.c_int64,
    "int64_t": ctypes.c_int64,
    "unsigned long long": ctypes.c_uint64,
    "uint64_t": ctypes.c_uint64,
    "size_t": ctypes.c_size_t,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
}
_QUALIFIERS = {"const", "volatile", "__restrict__", "__restrict", "__grid_constant__", "struct"}


def _param_kind(decl: str, name: str) -> tuple[str, type[Any] | None]:
    """("ptr", None), ("scalar", ctype) or ("struct", None) for one C++ parameter."""
    ctype = decl[: decl.rstrip().rfind(name)].strip()
    if "*" in ctype or "&" in ctype:
        return "ptr", None
    words = [w for w in ctype.replace("std::", "").split() if w not in _QUALIFIERS]
    scalar = _SCALARS.get(" ".join(words))
    return ("scalar", scalar) if scalar is not None else ("struct", None)


def _int_range(ctype: type[Any]) -> tuple[int, int] | None:
    if ctype in (ctypes.c_float, ctypes.c_double, ctypes.c_bool, ctypes.c_char):
        return None
    bits = 8 * ctypes.sizeof(ctype)
    signed = ctype(-1).value < 0
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


_PTR, _SCALAR, _STRUCT = 0, 1, 2


class _Storage:
    """Argument storage of a kernel: a ctypes value per parameter and the ``void*[]`` array.

    ``cuLaunchKernel`` copies the arguments before it returns, so one storage serves every launch
    of a thread (or of one :class:`BoundLaunch`); building it once keeps ctypes allocation out of
    the launch path.
    """

    def __init__(self, kinds: list[tuple[str, type[Any] | None]]) -> None:
        self.values: list[Any] = []
        self.array = (ctypes.c_void_p * max(1, len(kinds)))()
        for i, (kind, ctype) in enumerate(kinds):
            if kind == "ptr":
                value: Any = ctypes.c_uint64()
            elif kind == "scalar":
                assert ctype is not None
                value = ctypes.c_int8() if ctype is ctypes.c_char else ctype()
            else:
                value = None
            self.values.append(value)
            if value is not None:
                self.array[i] = ctypes.addressof(value)
        self.address = ctypes.addressof(self.array)


class _Slots(threading.local):
    """One :class:`_Storage` per thread."""

    def __init__(self, kinds: list[tuple[str, type[Any] | None]]) -> None:
        self.storage = _Storage(kinds)


class _Packer:
    """Checks a kernel's launch arguments and writes them into the thread's :class:`_Slots`."""

    def __init__(self, spec: KernelSpec) -> None:
        self.spec = spec
        self.names = param_names(spec.params)
        kinds = [_param_kind(d, n) for d, n in zip(spec.params, self.names, strict=True)]
        self.codes = [{"ptr": _PTR, "scalar": _SCALAR}.get(k, _STRUCT) for k, _ in kinds]
        self.ctypes = [c for _, c in kinds]
        self.bounds = [None if c is None else _int_range(c) for c in self.ctypes]
        self.kinds = kinds
        self.slots = _Slots(kinds)

    def pack(self, args: Sequence[object], storage: _Storage | None = None) -> int:
        """The address of the ``void*[]`` kernel-parameter array holding ``args``.

        Written into ``storage``, by default the calling thread's.
        """
        if len(args) != len(self.codes):
            raise TypeError(
                f"kernel {self.spec.name} takes {len(self.codes)} arguments "
                f"({', '.join(self.names)}), got {len(args)}"
            )
        slots = self.slots.storage if storage is None else storage
        values = slots.values
        codes, bounds = self.codes, self.bounds
        # The common cases (an int address or CUDA tensor, an in-range int) take the first test
        # of each branch; everything else, errors included, goes through the checked helpers.
        for i, value in enumerate(args):
            code = codes[i]
            if code == _PTR:
                if type(value) is int and value >= 0:
                    values[i].value = value
                elif isinstance(value, torch.Tensor) and value.is_cuda:
                    values[i].value = value.data_ptr()
                else:
                    values[i].value = self._pointer(i, value)
            elif code == _SCALAR:
                limits = bounds[i]
                if type(value) is int and limits is not None and limits[0] <= value <= limits[1]:
                    values[i].value = value
                else:
                    values[i].value = self._scalar(i, value)
            else:
                if not isinstance(value, (ctypes.Structure, ctypes.Union, ctypes.Array)):
                    raise TypeError(
                        f"argument {self.names[i]} of {self.spec.name} is passed by value: give "
                        f"a ctypes.Structure, got {type(value).__name__}"
                    )
                # The caller's object stays alive for the whole call (it is in ``args``).
                slots.array[i] = ctypes.addressof(value)
        return slots.address

    def _pointer(self, i: int, value: object) -> int:
        if isinstance(value, torch.Tensor):
            raise TypeError(
                f"argument {self.names[i]} of {self.spec.name}: tensor on "
                f"{value.device}, expected a CUDA tensor"
            )
        if value is None:
            return 0
        raise TypeError(
            f"argument {self.names[i]} of {self.spec.name} is a pointer: pass a "
            f"tensor, an int address or None, not {type(value).__name__}"
        )

    def _scalar(self, i: int, value: object) -> Any:
        ctype = self.ctypes[i]
        if ctype is not None and isinstance(value, ctype):
            value = value.value
        if isinstance(value, bytes) and ctype is ctypes.c_char and len(value) == 1:
            return value[0]
        if not isinstance(value, (int, float, bool)):
            raise TypeError(
                f"argument {self.names[i]} of {self.spec.name} must be a number, "
                f"got {type(value).__name__}"
            )
        bounds = self.bounds[i]
        if bounds is not None:
            if not isinstance(value, int):
                raise TypeError(
                    f"argument {self.names[i]} of {self.spec.name} must be an int, got {value!r}"
                )
            if not bounds[0] <= value <= bounds[1]:
                assert ctype is not None
                raise ValueError(
                    f"argument {self.names[i]}={value} of {self.spec.name} does not fit "
                    f"in {ctype.__name__}"
                )
        return value

from __future__ import annotations

import pytest

from ep_jit import KernelSpec, __version__
from ep_jit.spec import param_names


def _spec(**overrides: object) -> KernelSpec:
    kwargs: dict[str, object] = {
        "name": "demo",
        "includes": ["ep_jit/smxx_toy.cuh"],
        "template": "ns::impl",
        "params": ["const float* __restrict__ x", "int64_t n"],
        "constants": {"kBig": 1 << 40, "kFlag": True, "kType": "__nv_bfloat16", "kNeg": -3},
    }
    kwargs.update(overrides)
    return KernelSpec(**kwargs)  # type: ignore[arg-type]


def test_render_is_exact() -> None:
    spec = _spec(launch_bounds=(128, 2), defines={"EP_BITS": 8, "EP_FLAG": None})
    assert spec.render() == (
        f"// ep-jit {__version__} generated source for kernel 'demo'\n"
        "#define EP_BITS 8\n"
        "#define EP_FLAG\n"
        "#include <ep_jit/smxx_toy.cuh>\n"
        "\n"
        "// kBig = 1099511627776ll, kFlag = true, kType = __nv_bfloat16, kNeg = -3\n"
        'extern "C" __global__ void __launch_bounds__(128, 2) demo('
        "const float* __restrict__ x, int64_t n) {\n"
        "  ns::impl<1099511627776ll, true, __nv_bfloat16, -3>(x, n);\n"
        "}\n"
    )


def test_no_constants_calls_plain_function() -> None:
    text = _spec(constants={}, entry="entry_fn", params=[]).render()
    assert 'extern "C" __global__ void entry_fn() {\n  ns::impl();\n}' in text


def test_specs_are_values() -> None:
    a, b = _spec(), _spec()
    assert a == b
    assert hash(a) == hash(b)
    assert a.with_constants(kNeg=4) != a
    assert dict(a.with_constants(kNeg=4).constants)["kNeg"] == 4
    assert [k for k, _ in a.with_constants(kNew=1).constants][-1] == "kNew"
    assert a.entry == "demo"


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"name": "bad name"}, ValueError, "identifier"),
        ({"template": "ns::impl<3>"}, ValueError, "template"),
        ({"includes": []}, ValueError, "no header"),
        ({"includes": ["../etc/passwd.h"]}, ValueError, "include"),
        ({"includes": "ep_jit/x.cuh"}, TypeError, "sequences"),
        ({"params": ["float*"]}, ValueError, "parameter"),
        ({"params": ["int a", "int a"]}, ValueError, "repeat"),
        ({"constants": {"k": 1.5}}, TypeError, "bool, int or str"),
        ({"constants": {"k": "x; }"}}, ValueError, "not a C"),
        ({"constants": {"k": 1 << 70}}, ValueError, "64 bits"),
        ({"launch_bounds": 0}, ValueError, "launch_bounds"),
        ({"extra_flags": ["O3"]}, ValueError, "start with"),
    ],
)
def test_validation(overrides: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _spec(**overrides)


def test_param_names() -> None:
    assert param_names(["const uint64_t* ptrs", "ep_jit::WaitContext ctx", "int n"]) == [
        "ptrs",
        "ctx",
        "n",
    ]

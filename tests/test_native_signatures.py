"""The kernels' argument lists in lowmem.optim._native (``_SIGNATURES``, ``ELEMENTWISE``) against
the exported definitions in ``_native_kernels.c``: ctypes passes whatever the table says, so an
argument missing, of the wrong type or in the wrong order there is memory corruption, not an error.

The C side is read after the C preprocessor (``cc -E``), so definitions and bodies that macros
generate are seen as the compiler sees them; without a C compiler the tests are skipped (and the
kernels are not built either).
"""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from lowmem.optim import _native

_QUALIFIERS = {"const", "restrict", "__restrict", "__restrict__", "volatile"}
_CTYPES = {ctypes.c_int64: "int64_t", ctypes.c_int: "int", ctypes.c_float: "float"}
# A definition's head once bodies are emptied: what precedes it since the last ; { or }, its name,
# its parameters (no parentheses inside: no function-pointer parameters) and its emptied body.
_DEFINITION = re.compile(r"(?:^|(?<=[;{}]))([^;{}]*?)\b(lowmem_\w+)\s*\(([^()]*)\)\s*\{\}")


class Param(NamedTuple):
    name: str
    base: str  # the type without qualifiers or pointers: "float", "int64_t", ...
    depth: int  # how many pointers


class Definition(NamedTuple):
    returns: str
    params: list[Param]


def _preprocess(path: Path) -> str:
    compiler = _native.c_compiler()
    if compiler is None:
        pytest.skip("no C compiler: the C preprocessor reads the kernels' definitions")
    command = [compiler, "-E", "-P", "-std=c11", str(path)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def _top_level(code: str) -> str:
    """``code`` with each outermost brace-enclosed block emptied to ``{}``: declarations and the
    heads of definitions are left, function bodies (and their calls) are gone."""
    out, depth = [], 0
    for char in code:
        if char == "{":
            depth += 1
            if depth == 1:
                out.append(char)
        elif char == "}":
            depth -= 1
            if depth == 0:
                out.append(char)
        elif depth == 0:
            out.append(char)
    return "".join(out)


def _param(declaration: str) -> Param:
    """``const float *restrict g`` -> Param("g", "float", 1)."""
    *base, name = [word for word in re.findall(r"\w+", declaration) if word not in _QUALIFIERS]
    return Param(name, " ".join(base), declaration.count("*"))


def exported_definitions(path: Path) -> dict[str, Definition]:
    """The non-static ``lowmem_*`` function definitions of the C file ``path``, macros expanded."""
    definitions = {}
    for match in _DEFINITION.finditer(_top_level(_preprocess(path))):
        prefix, name, params = match.groups()
        words = re.findall(r"\w+", re.sub(r"__attribute__\s*\(\(.*?\)\)", " ", prefix))
        if "static" not in words:
            definitions[name] = Definition(words[-1], [_param(p) for p in params.split(",") if p.strip() != "void"])
    return definitions


def _ctype(argtype) -> tuple[str, int]:
    """(base, pointer depth) of a ctypes argument type; ``c_void_p``: ("void", 1), any data pointer."""
    if argtype is ctypes.c_void_p:
        return "void", 1
    if argtype in _CTYPES:
        return _CTYPES[argtype], 0
    if issubclass(argtype, ctypes._Pointer):
        base, depth = _ctype(argtype._type_)
        return base, depth + 1
    raise TypeError(f"no C type for {argtype}")


def _matches(param: Param, argtype) -> bool:
    base, depth = _ctype(argtype)
    return depth == param.depth and (base == param.base or (base == "void" and depth > 0))


def _argument_errors(name: str, argtypes: list, definition: Definition) -> list[str]:
    params = definition.params
    errors = [] if definition.returns == "int" else [f"{name}: returns {definition.returns} in C, int in _native._bind"]
    if len(argtypes) != len(params):
        return [*errors, f"{name}: {len(argtypes)} arguments in _SIGNATURES, {len(params)} in C"]
    return errors + [
        f"{name}: argument {i} ({p.name}) is {p.base}{'*' * p.depth} in C but {argtype.__name__} in _SIGNATURES"
        for i, (argtype, p) in enumerate(zip(argtypes, params), 1)
        if not _matches(p, argtype)
    ]


def _elementwise_errors(name: str, lists: int, scalars: tuple[str, ...], definition: Definition | None) -> list[str]:
    """The tensor lists (``float **``) and the scalar names, in order, against the C floats."""
    if definition is None:
        return [f"{name}: in ELEMENTWISE but not exported by the C file"]
    floats = tuple(p.name for p in definition.params if (p.base, p.depth) == ("float", 0))
    errors = []
    if scalars != floats:
        errors.append(f"{name}: ELEMENTWISE names {len(scalars)} scalars {scalars}, C takes {len(floats)}: {floats}")
    arrays = sum((p.base, p.depth) == ("float", 2) for p in definition.params)
    if arrays != lists:
        errors.append(f"{name}: ELEMENTWISE says {lists} tensor lists, C takes {arrays}")
    return errors


def signature_errors(signatures: dict, elementwise: dict, definitions: dict[str, Definition]) -> list[str]:
    """Every disagreement between the Python tables and the C definitions, one line each."""
    c_names, table_names = definitions.keys(), signatures.keys()
    errors = [f"{name}: exported by the C file but not in _SIGNATURES" for name in c_names - table_names]
    errors += [f"{name}: in _SIGNATURES but not exported by the C file" for name in table_names - c_names]
    for name in c_names & table_names:
        errors += _argument_errors(name, signatures[name], definitions[name])
    for name, (lists, scalars) in elementwise.items():
        errors += _elementwise_errors(name, lists, tuple(scalars), definitions.get(name))
    return sorted(errors)


@pytest.fixture(scope="module")
def definitions() -> dict[str, Definition]:
    return exported_definitions(_native.SOURCE)


def test_the_tables_match_the_c_definitions(definitions):
    assert "lowmem_adamw_f32" in definitions and "lowmem_ioadam_f32" in definitions  # the parser finds them
    assert signature_errors(_native._SIGNATURES, _native.ELEMENTWISE, definitions) == []


def test_the_parser_expands_macros_and_skips_static_functions_and_prototypes(tmp_path):
    source = tmp_path / "kernels.c"
    source.write_text("""#include <stdint.h>
#define KERNEL(NAME, T) int NAME(int n, const T *restrict x, T **y, int threads) { return n + threads; }
KERNEL(lowmem_made_f32, float)
static inline __attribute__((always_inline)) int lowmem_helper(int x) { return lowmem_made_f32(x, 0, 0, 1); }
int lowmem_declared(int64_t n, float s);
int lowmem_plain(void) { struct { int a; } s = {0}; return s.a; }
""")
    assert exported_definitions(source) == {
        "lowmem_made_f32": Definition("int", [Param("n", "int", 0), Param("x", "float", 1), Param("y", "float", 2),
                                              Param("threads", "int", 0)]),
        "lowmem_plain": Definition("int", []),
    }  # fmt: skip


def _broken(table: dict, name: str, edit) -> dict:
    """A copy of ``table`` whose entry ``name`` is ``edit(entry)``."""
    return {**table, name: edit(table[name])}


@pytest.mark.parametrize(
    "wrong, expected",
    [
        (lambda s, e: (_broken(s, "lowmem_adamw_f32", lambda a: a[:5] + a[6:]), e),
         "lowmem_adamw_f32: 13 arguments in _SIGNATURES, 14 in C"),
        (lambda s, e: (_broken(s, "lowmem_slim_rows_f32", lambda a: [ctypes.c_int, *a[1:]]), e),
         "lowmem_slim_rows_f32: argument 1 (R) is int64_t in C but c_int in _SIGNATURES"),
        (lambda s, e: (_broken(s, "lowmem_adapm_f32", lambda a: [*a[:2], ctypes.c_void_p, *a[3:]]), e),
         "lowmem_adapm_f32: argument 3 (w) is float** in C but c_void_p in _SIGNATURES"),
        (lambda s, e: (_broken(s, "lowmem_ioadam_f32", lambda a: [*a[:12], ctypes.POINTER(ctypes.c_int), *a[13:]]), e),
         "lowmem_ioadam_f32: argument 13 (m_decay) is float* in C but LP_c_int in _SIGNATURES"),
        (lambda s, e: (s, _broken(e, "lowmem_adams_f32", lambda x: (x[0], (x[1][1], x[1][0], *x[1][2:])))),
         "lowmem_adams_f32: ELEMENTWISE names 6 scalars ('old_m_weight', 'param_decay'"),
        (lambda s, e: (s, _broken(e, "lowmem_hmadam_f32", lambda x: (x[0], x[1][:-1]))),
         "lowmem_hmadam_f32: ELEMENTWISE names 9 scalars"),
        (lambda s, e: (s, _broken(e, "lowmem_adamw_f32", lambda x: (3, x[1]))),
         "lowmem_adamw_f32: ELEMENTWISE says 3 tensor lists, C takes 4"),
        (lambda s, e: ({k: v for k, v in s.items() if k != "lowmem_power_sum_f32"}, e),
         "lowmem_power_sum_f32: exported by the C file but not in _SIGNATURES"),
        (lambda s, e: ({**s, "lowmem_gone_f32": [ctypes.c_int]}, e),
         "lowmem_gone_f32: in _SIGNATURES but not exported by the C file"),
    ],
    ids=["argument removed", "wrong scalar type", "pointer depth", "wrong pointee", "scalars swapped",
         "scalar missing", "tensor lists", "kernel not in the table", "kernel not in C"],
)  # fmt: skip
def test_the_check_reports_a_wrong_table(definitions, wrong, expected):
    signatures, elementwise = wrong(_native._SIGNATURES, _native.ELEMENTWISE)
    errors = signature_errors(signatures, elementwise, definitions)
    assert len(errors) == 1 and errors[0].startswith(expected), errors

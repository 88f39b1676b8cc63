"""What a ``when`` condition costs per request: today's language against CEL libraries.

Each condition is compiled once, as the gateway does at start-up, and then
evaluated again and again against the same request fields; the number printed
is the CPU time of one evaluation in microseconds (``timeit`` with
``time.process_time``, median of ``--repeat`` runs of ``--number`` calls each),
and in brackets the fastest run.
Form fields arrive as text, so the CEL rows for them convert with ``double()``
(CEL's own) or with a function written in Python (``number()``, what a gateway
would add to keep today's strict number grammar); JSON fields arrive typed. The
last table is the gateway's own path: each old condition against its CEL
rewrite, both through ``holds()``.

Usage::

    python bench/conditions.py                  # every library that is installed
    python bench/conditions.py --number 20000 --repeat 15

The CEL libraries are optional: a library that is not installed is reported
as such and skipped. Candidates measured:

    today                       gateway.conditions (hand-written, pure Python)
    cel-expr-python             Google's CEL-C++ runtime, bound with pybind11
    common-expression-language  cel-rust, bound with PyO3 (import name ``cel``)
    cel-python                  pure Python on lark (import name ``celpy``)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.conditions import Facts, parse_condition

FORM = {"amount": "5000.00", "currency": "EUR", "country": "PL", "iban": "DE89370400440532013000"}
IBAN = FORM["iban"]
JSON = {"amount": Decimal("5000.00"), "currency": "EUR", "country": "PL", "iban": IBAN}
JSON_CEL = {"amount": 5000.0, "currency": "EUR", "country": "PL", "iban": IBAN}
# A large form: 30 more fields the condition does not read (what passing all of them costs).
WIDE = FORM | {f"field{i}": "x" * 20 for i in range(30)}

# (name, today's syntax or None, CEL over typed JSON, CEL over form text)
CASES: list[tuple[str, object, str, str]] = [
    (
        "number",
        "amount > 1000",
        "fields.amount > 1000.0",
        "double(fields.amount) > 1000.0",
    ),
    (
        "in-list",
        "country in [DE, FR, NL, BE, LU]",
        'fields.country in ["DE", "FR", "NL", "BE", "LU"]',
        'fields.country in ["DE", "FR", "NL", "BE", "LU"]',
    ),
    (
        "and/or",
        {"any": [["amount > 1000", "currency == EUR"], "country not in [DE, FR]"]},
        '(fields.amount > 1000.0 && fields.currency == "EUR") || !(fields.country in ["DE", "FR"])',
        '(double(fields.amount) > 1000.0 && fields.currency == "EUR")'
        ' || !(fields.country in ["DE", "FR"])',
    ),
    (
        "startsWith",
        None,
        'fields.iban.startsWith("DE")',
        'fields.iban.startsWith("DE")',
    ),
    (
        "regex",
        None,
        'fields.iban.matches("^DE[0-9]{20}$")',
        'fields.iban.matches("^DE[0-9]{20}$")',
    ),
    (
        "missing",
        "limit > 1000",
        "fields.limit > 1000.0",
        "double(fields.limit) > 1000.0",
    ),
]
# The same "number" case with a conversion function written in Python, per library.
PY_NUMBER = ("number()", "number(fields.amount) > 1000.0")
# The "number" case against a form with 30 more fields, all of them passed to CEL.
WIDE_ROW = "wide form"


def number(value: object) -> float:
    """What a gateway-provided conversion costs: text or number to a double."""
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Timing:
    """µs per call: the median of the timing runs, and the fastest (least disturbed by
    other processes on a shared machine, as the timeit documentation advises)."""

    median: float
    fastest: float

    def __str__(self) -> str:
        return f"{self.median:7.2f} ({self.fastest:.2f})"


def per_call_us(call: Callable[[], object], number_: int, repeat: int) -> Timing:
    call()  # warm: the first call may build caches
    # CPU time of this process, not wall time: on a shared machine other processes then
    # cost nothing here (bench/run.py's "cpu us/req" column does the same).
    times = timeit.repeat(call, number=number_, repeat=repeat, timer=time.process_time)
    runs = [run / number_ * 1e6 for run in times]
    return Timing(statistics.median(runs), min(runs))


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def today_rows(args: argparse.Namespace) -> dict[str, tuple[Timing | None, Timing | None]]:
    rows: dict[str, tuple[Timing | None, Timing | None]] = {}
    for name, old, _json_src, _form_src in CASES:
        if old is None:
            rows[name] = (None, None)
            continue
        condition = parse_condition(old)
        form, typed = Facts(fields=FORM), Facts(fields=JSON)
        rows[name] = (
            per_call_us(lambda c=condition, f=typed: c.holds(f), args.number, args.repeat),
            per_call_us(lambda c=condition, f=form: c.holds(f), args.number, args.repeat),
        )
    wide, condition = Facts(fields=WIDE), parse_condition(CASES[0][1])
    rows[WIDE_ROW] = (None, per_call_us(lambda: condition.holds(wide), args.number, args.repeat))
    return rows


def google_rows(args: argparse.Namespace) -> dict[str, tuple[Timing | None, Timing | None]]:
    from cel_expr_python import cel

    any_map = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
    env = cel.NewEnv(variables={"fields": any_map})
    number_decl = cel.FunctionDecl(
        "number",
        [
            cel.Overload(
                "number_dyn",
                return_type=cel.Type.DOUBLE,
                parameters=[cel.Type.DYN],
                impl=number,
            )
        ],
    )
    env_fn = cel.NewEnv(variables={"fields": any_map}, functions=[number_decl])

    def holds(expression: object, fields: dict[str, object]) -> bool:
        result = expression.eval(data={"fields": fields})  # type: ignore[attr-defined]
        value = result.value()
        return value is not False  # an error value counts as true, as today

    rows: dict[str, tuple[Timing | None, Timing | None]] = {}
    for name, _old, json_src, form_src in CASES:
        typed, form = env.compile(json_src), env.compile(form_src)
        rows[name] = (
            per_call_us(lambda e=typed: holds(e, JSON_CEL), args.number, args.repeat),
            per_call_us(lambda e=form: holds(e, FORM), args.number, args.repeat),
        )
    expression = env_fn.compile(PY_NUMBER[1])
    rows[PY_NUMBER[0]] = (
        None,
        per_call_us(lambda: holds(expression, FORM), args.number, args.repeat),
    )
    wide = env.compile(CASES[0][3])
    rows[WIDE_ROW] = (None, per_call_us(lambda: holds(wide, WIDE), args.number, args.repeat))
    return rows


def rust_rows(args: argparse.Namespace) -> dict[str, tuple[Timing | None, Timing | None]]:
    import cel

    def holds(program: object, context: object) -> bool:
        try:
            return program.execute(context) is not False  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError, RuntimeError):
            return True

    rows: dict[str, tuple[Timing | None, Timing | None]] = {}
    for name, _old, json_src, form_src in CASES:
        typed, form = cel.compile(json_src), cel.compile(form_src)
        rows[name] = (
            per_call_us(lambda p=typed: holds(p, {"fields": JSON_CEL}), args.number, args.repeat),
            per_call_us(lambda p=form: holds(p, {"fields": FORM}), args.number, args.repeat),
        )
    program = cel.compile(PY_NUMBER[1])

    def with_function() -> bool:
        context = cel.Context(variables={"fields": FORM}, functions={"number": number})
        return holds(program, context)

    rows[PY_NUMBER[0]] = (None, per_call_us(with_function, args.number, args.repeat))
    wide = cel.compile(CASES[0][3])
    rows[WIDE_ROW] = (
        None,
        per_call_us(lambda: holds(wide, {"fields": WIDE}), args.number, args.repeat),
    )
    return rows


def pure_rows(args: argparse.Namespace) -> dict[str, tuple[Timing | None, Timing | None]]:
    import celpy

    env = celpy.Environment()
    number_ = max(args.number // 20, 50)  # ~100x slower: fewer calls, same repeats

    def holds(program: object, fields: dict[str, object]) -> bool:
        try:
            activation = {"fields": celpy.json_to_cel(fields)}
            return bool(program.evaluate(activation))  # type: ignore[attr-defined]
        except celpy.CELEvalError:
            return True

    rows: dict[str, tuple[Timing | None, Timing | None]] = {}
    for name, _old, json_src, form_src in CASES:
        typed = env.program(env.compile(json_src))
        form = env.program(env.compile(form_src))
        rows[name] = (
            per_call_us(lambda p=typed: holds(p, JSON_CEL), number_, args.repeat),
            per_call_us(lambda p=form: holds(p, FORM), number_, args.repeat),
        )
    return rows


LIBRARIES: list[tuple[str, str, Callable[[argparse.Namespace], dict]]] = [
    ("today", "stepup-gateway", today_rows),
    ("cel-expr-python", "cel-expr-python", google_rows),
    ("common-expression-language", "common-expression-language", rust_rows),
    ("cel-python", "cel-python", pure_rows),
]


def import_ms(module: str) -> float | None:
    """The cold import time of a library, in a fresh interpreter."""
    import subprocess

    code = f"import time; t=time.perf_counter(); import {module}; print(time.perf_counter()-t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return float(done.stdout) * 1000 if done.returncode == 0 else None


def show(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:8.2f}" if isinstance(value, float) else str(value)


def gateway_rows(args: argparse.Namespace) -> None:
    """The gateway's own path: each old condition and its CEL rewrite, as ``holds()``."""
    from gateway.cel import compile_cel
    from gateway.cel_rewrite import to_cel

    print("-- as the gateway evaluates them: old syntax vs its CEL rewrite (gateway.cel)")
    print(f"{'case':<12}{'old':>18}{'CEL':>18}  rewrite")
    for name, old, _json_src, _form_src in CASES:
        if old is None:
            continue
        condition = parse_condition(old)
        rewrite = compile_cel(to_cel(condition))
        for label, fields in ((name, FORM), (f"{name} wide", WIDE)):
            given = Facts(fields=fields)
            before = per_call_us(lambda c=condition, f=given: c.holds(f), args.number, args.repeat)
            after = per_call_us(lambda c=rewrite, f=given: c.holds(f), args.number, args.repeat)
            text = to_cel(condition) if fields is FORM else "(form with 30 more fields)"
            print(f"{label:<12}{before!s:>18}{after!s:>18}  {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=10_000, help="calls per timing run")
    parser.add_argument("--repeat", type=int, default=9, help="timing runs (median taken)")
    args = parser.parse_args()
    modules = {
        "today": "gateway.conditions",
        "cel-expr-python": "cel_expr_python.cel",
        "common-expression-language": "cel",
        "cel-python": "celpy",
    }
    names = [name for name, *_ in CASES] + [PY_NUMBER[0], WIDE_ROW]
    print(
        f"python {sys.version.split()[0]}; CPU µs per evaluation: median of {args.repeat} runs"
        " (fastest run)"
    )
    print(f"{'case':<12}" + "".join(f"{lib[:18]:>22}" for lib, *_ in LIBRARIES))
    results: dict[str, dict[str, tuple[Timing | None, Timing | None]]] = {}
    for lib, dist, rows in LIBRARIES:
        if version(dist) == "not installed":
            results[lib] = {}
            continue
        started = time.perf_counter()
        results[lib] = rows(args)
        print(f"  ({lib} {version(dist)} measured in {time.perf_counter() - started:.1f} s)")
    for kind, index in (("json", 0), ("form", 1)):
        print(f"-- fields from a {kind} body")
        for name in names:
            cells = [results[lib].get(name, (None, None))[index] for lib, *_ in LIBRARIES]
            print(f"{name:<12}" + "".join(f"{show(cell):>22}" for cell in cells))
    if version("cel-expr-python") != "not installed":
        gateway_rows(args)
    print("-- cold import, ms")
    print(
        f"{'import':<12}" + "".join(f"{show(import_ms(modules[lib])):>22}" for lib, *_ in LIBRARIES)
    )


if __name__ == "__main__":
    main()

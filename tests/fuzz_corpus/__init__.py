"""Fuzzing the parsers that take outside input: targets, bounds, and what once failed.

A `Target` is one parser with a hypothesis strategy for its input (near-valid inputs,
mutated) and a check: the parser's properties. `tests/unit/test_fuzz_*.py` run every
target in the unit tier (few examples, derandomized, quiet); `bench/fuzz.py` runs the
same targets for longer and with larger inputs.

A check fails in one of three ways, each with a stable `signature`: an exception the
parser does not document (a crash, named by the innermost function of agent/ it came
from), a `Violation` of a stated property, or a `Hang` (over the time bound).

The directories beside this file hold the corpus: `<target>/<name>.txt`, one input that
once failed, replayed by tests/unit/test_fuzz_corpus.py. A file starts with `# key:
value` lines (`signature`, `kind`: crash, violation or hang, `gist`: the traceback's
last lines, and `xfail`: why it still fails, while a fix is owed) and then the input as a
Python literal, where `b"x" * 1000` may shorten a run. The unit tier's properties let a
failure pass whose signature an `xfail` case has: the corpus tracks it, strictly (a fix
makes that case pass, and the test then asks for the `xfail` line to go).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Verbosity, given, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).resolve().parent
REPO = CORPUS.parents[1]
# the modules that define targets, each a list TARGETS
MODULES = (
    "tests.unit.test_fuzz_dns",
    "tests.unit.test_fuzz_leases",
    "tests.unit.test_fuzz_config",
    "tests.unit.test_fuzz_state",
    "tests.unit.test_fuzz_stub",
    "tests.unit.test_fuzz_control",
    "tests.unit.test_fuzz_dnr",
    "tests.unit.test_fuzz_ddr",
)
HANG_SECONDS = 2.0  # one example, in the unit tier and when a case is replayed

# The unit tier: reproducible (the seed comes from the test's name), no example
# database, silent; the deadline catches what is slow but returns, the alarm of
# `bounded` what would not.
UNIT = settings(
    max_examples=150,
    deadline=timedelta(seconds=HANG_SECONDS),
    derandomize=True,
    database=None,
    verbosity=Verbosity.normal,  # says nothing unless a property fails
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Violation(AssertionError):
    """A stated property does not hold; `what` names it (the signature)."""

    def __init__(self, what: str, detail: str = "") -> None:
        super().__init__(f"{what}: {detail}" if detail else what)
        self.what = what


class Hang(Exception):
    """An example ran past its time bound."""


def expect(condition: object, what: str, detail: object = "") -> None:
    if not condition:
        raise Violation(what, str(detail)[:300])


@dataclass(frozen=True)
class Target:
    name: str
    # big=False: sizes for the unit tier; True: bench/fuzz.py's (up to 64 KiB)
    strategy: Callable[[bool], st.SearchStrategy[Any]]
    check: Callable[[Any], None]
    max_examples: int = 150


@cache
def targets() -> dict[str, Target]:
    found: dict[str, Target] = {}
    for name in MODULES:
        for t in importlib.import_module(name).TARGETS:
            found[t.name] = t
    return found


# -- time bounds and signatures ----------------------------------------------------------------


@contextlib.contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """Raise Hang in Python code still running after `seconds` (an alarm: the main thread
    only; a long call into C, a regular expression, ends first and is then measured)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(_sig: int, _frame: object) -> None:
        raise Hang(f"still running after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _name(exc: BaseException) -> str:
    kind = type(exc)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _where(filename: str) -> str:
    path = Path(filename)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else filename


def signature(exc: BaseException) -> str:
    """Stable across edits: the exception type and the innermost function of agent/."""
    if isinstance(exc, Hang):
        return "hang"
    if isinstance(exc, Violation):
        return f"violation: {exc.what}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/agent/" in f.filename]
    if not frames:
        return f"{_name(exc)} outside agent/"
    return f"{_name(exc)} in {_where(frames[-1].filename)}:{frames[-1].name}"


def gist(exc: BaseException) -> str:
    """The last frames (file, line, function, code) and the message; a violation's message."""
    if isinstance(exc, Violation):
        return str(exc)
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    lines = [f"{_where(f.filename)}:{f.lineno} {f.name}: {(f.line or '').strip()}" for f in frames]
    return "\n".join([*lines, f"{_name(exc)}: {exc}"[:300]])


def run_checked(target: Target, value: Any, seconds: float) -> tuple[float, BaseException | None]:
    """One example: (seconds it took, the failure or None). An example over `seconds`
    that did return is a Hang too."""
    start = time.perf_counter()
    try:
        with bounded(seconds * 5):
            target.check(value)
    except Exception as exc:
        return time.perf_counter() - start, exc
    elapsed = time.perf_counter() - start
    if elapsed > seconds:
        return elapsed, Hang(f"took {elapsed:.2f} s, over {seconds:g} s")
    return elapsed, None


def property_test(target: Target) -> Callable[[], None]:
    """The unit tier's test of `target`: its check on hypothesis' examples; a failure the
    corpus tracks as xfail (same signature) passes here."""
    known = known_signatures(target.name)

    @settings(UNIT, max_examples=target.max_examples)
    @given(target.strategy(False))
    def test(value: Any) -> None:
        try:
            with bounded(HANG_SECONDS * 5):
                target.check(value)
        except Exception as exc:
            if signature(exc) in known:
                return
            raise

    return test


# -- building inputs: mutations of valid seeds -------------------------------------------------

_POS = st.one_of(st.integers(0, 15), st.integers(0, 1 << 16))
_BYTE_OPS = st.one_of(
    st.tuples(st.just("set"), _POS, st.integers(0, 255)),
    st.tuples(st.just("set16"), _POS, st.sampled_from([0, 1, 2, 0xFF, 0x8000, 0xFFFF])),
    st.tuples(st.just("cut"), _POS, st.just(0)),
    st.tuples(st.just("insert"), _POS, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), _POS, st.integers(1, 8)),
    st.tuples(st.just("append"), st.just(0), st.binary(max_size=16)),
)


def _mutate(data: bytes, ops: list[tuple[str, int, Any]]) -> bytes:
    buf = bytearray(data)
    for op, pos, arg in ops:
        at = pos % (len(buf) + 1)
        if op == "set" and buf:
            buf[at % len(buf)] = arg
        elif op == "set16" and len(buf) >= 2:
            at = min(at, len(buf) - 2)
            buf[at : at + 2] = arg.to_bytes(2, "big")
        elif op == "cut":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = arg
        elif op == "delete":
            del buf[at : at + arg]
        elif op == "append":
            buf += arg
    return bytes(buf)


MUTATIONS = st.lists(_BYTE_OPS, max_size=4)


def mutate(data: bytes, ops: list[tuple[str, int, Any]]) -> bytes:
    """`data` with MUTATIONS' operations applied (for a composite strategy)."""
    return _mutate(data, ops)


def mutated(seeds: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid seeds with a few byte-level mutations."""
    return st.tuples(seeds, MUTATIONS).map(lambda t: _mutate(*t))


# characters that parsers of text split, quote or stop on, and some they forget
TEXT_CHARS = "\n\r\t {}[]();:,=#\"'\\./-_*%@\x00\x1b\x7f\x85\xa0\u2028\u2029\ufeffé"
_TEXT_OPS = st.one_of(
    st.tuples(
        st.just("insert"), _POS, st.text(st.sampled_from(TEXT_CHARS), min_size=1, max_size=4)
    ),
    st.tuples(st.just("insert"), _POS, st.text(max_size=6)),
    st.tuples(st.just("delete"), _POS, st.integers(1, 6)),
    st.tuples(st.just("cut"), _POS, st.just(0)),
)


def _mutate_text(text: str, ops: list[tuple[str, int, Any]]) -> str:
    for op, pos, arg in ops:
        at = pos % (len(text) + 1)
        if op == "insert":
            text = text[:at] + arg + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + arg :]
        elif op == "cut":
            text = text[:at]
    return text


_TEXT_MUTATIONS = st.lists(_TEXT_OPS, max_size=3)


def mutated_text(seeds: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(seeds, _TEXT_MUTATIONS).map(lambda t: _mutate_text(*t))


_TEXT = st.one_of(
    st.text(st.sampled_from(TEXT_CHARS + "abc019"), max_size=12), st.text(max_size=12)
)


def text_values() -> st.SearchStrategy[str]:
    """Short text: mostly the characters parsers care about, some of anything. (One
    strategy object: hypothesis spends its time on building them, not drawing.)"""
    return _TEXT


def repeats(tokens: list[bytes], big: bool) -> st.SearchStrategy[bytes]:
    """A token many times over (what makes a parser quadratic shows at bench sizes)."""
    sizes = st.integers(0, 256)
    if big:  # hypothesis draws small numbers mostly: ask for the large ones
        sizes = st.one_of(
            sizes, st.sampled_from([4096, 16384, 32768, 65536]), st.integers(0, 65536)
        )
    return st.builds(
        lambda pre, tok, n: pre + tok * (n // max(1, len(tok))),
        st.sampled_from([b"", *tokens]),
        st.sampled_from(tokens),
        sizes,
    )


# -- the corpus: one literal per file ----------------------------------------------------------

_HEADER = re.compile(r"#\s*([a-z-]+):\s?(.*)")


@dataclass(frozen=True)
class Case:
    target: str
    path: Path
    headers: dict[str, str]
    text: str

    @property
    def value(self) -> Any:
        return load(self.text)

    @property
    def xfail(self) -> str | None:
        return self.headers.get("xfail")


def cases() -> list[Case]:
    out = []
    for d in sorted(p for p in CORPUS.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for f in sorted(d.glob("*.txt")):
            headers: dict[str, str] = {}
            body = []
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.startswith("#"):
                    if m := _HEADER.fullmatch(line):
                        key, value = m.groups()
                        headers[key] = f"{headers[key]}\n{value}" if key in headers else value
                else:
                    body.append(line)
            out.append(Case(d.name, f, headers, "\n".join(body)))
    return out


def known_signatures(target: str) -> frozenset[str]:
    return frozenset(
        c.headers.get("signature", "") for c in cases() if c.target == target and c.xfail
    )


def write_case(target: str, value: Any, headers: dict[str, str]) -> Path:
    body = dump(value)
    name = f"{headers.get('kind', 'crash')}-{hashlib.sha256(body.encode()).hexdigest()[:10]}.txt"
    path = CORPUS / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {k}: {line}" for k, v in headers.items() for line in v.splitlines() or [""]]
    path.write_text("\n".join([*lines, body]) + "\n", encoding="utf-8")
    return path


def _runs(s: bytes | str) -> list[tuple[bytes | str, int]]:
    """`s` as (piece, times): runs of a unit up to 16 long that cover 48 or more."""
    out: list[tuple[bytes | str, int]] = []
    lit = 0
    i, n = 0, len(s)
    while i < n:
        best_unit, best_k = 0, 0
        for u in range(1, 17):
            if i + 2 * u > n:
                break
            unit = s[i : i + u]
            k = 1
            while s[i + k * u : i + (k + 1) * u] == unit:
                k += 1
            if k >= 4 and k * u >= 48 and k * u > best_unit * best_k:
                best_unit, best_k = u, k
        if best_k:
            if lit < i:
                out.append((s[lit:i], 1))
            out.append((s[i : i + best_unit], best_k))
            i += best_unit * best_k
            lit = i
        else:
            i += 1
    if lit < n or not out:
        out.append((s[lit:], 1))
    return out


def dump(value: Any) -> str:
    """A Python literal of `value`, long runs written as `piece * times`."""
    if isinstance(value, bytes | str):
        return " + ".join(repr(p) if k == 1 else f"{p!r} * {k}" for p, k in _runs(value))
    if isinstance(value, tuple):
        inner = ", ".join(map(dump, value))
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(map(dump, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{dump(k)}: {dump(v)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    raise TypeError(f"cannot keep a {type(value).__name__} in the corpus")


def load(text: str) -> Any:
    """The literal `dump` wrote: constants, tuples, lists, dicts, + and * (no names, no calls)."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {ev(k): ev(v) for k, v in zip(node.keys, node.values, strict=True) if k}
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return ev(node.left) + ev(node.right)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            left, right = ev(node.left), ev(node.right)
            if isinstance(right, int) and 0 <= right <= 1 << 20:
                return left * right
        raise ValueError(f"not a corpus literal: {ast.dump(node)[:80]}")

    return ev(ast.parse(text.strip(), mode="eval").body)


def in_child(fn: Callable[[], None], seconds: float) -> str | None:
    """Run `fn` in a forked child, at most `seconds`: None when it returned, else what
    went wrong (the traceback, or that it was still running and was killed)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        os.close(r)
        code = 0
        try:
            fn()
        except BaseException:
            os.write(w, traceback.format_exc()[-4000:].encode())
            code = 1
        os._exit(code)
    os.close(w)
    deadline = time.monotonic() + seconds
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return f"hang: still running after {seconds:g} s"
            time.sleep(0.005)
        with os.fdopen(r, "rb") as f:
            r = -1
            report = f.read().decode(errors="replace")
    finally:
        if r >= 0:
            os.close(r)
    return None if os.waitstatus_to_exitcode(status) == 0 else report or "failed"

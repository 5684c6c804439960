"""The code executor: AZR's environment.

In the paper (Sec. 3.2, "the environment"), a Python executor turns every proposal into a checked
task and grades every answer. A proposal (program p, input i) is kept only if it passes three checks:

  1. integrity   - p parses, p(i) runs without error and returns within the time limit;
  2. safety      - p uses no forbidden module (the paper's list, extended here, see BANNED_MODULES);
  3. determinism - two runs give the same output.

`Executor.validate` is those three checks; `Executor.run` is one call of f(*input), used to grade
answers (Eq. 5). The model is rewarded for finding weak spots, so it will write hostile programs.
The official code runs model strings in the trainer's own process; this project does not.

How one call runs (two layers):

  language layer (this file, in the host):
    - a static AST check before anything runs: banned modules, banned builtins (eval, exec, open, ...),
      dunder attributes used to climb out (__class__, __globals__, ...), frame attributes; the
      input text is checked the same way, as the argument list of a call f(...);
    - the host then compiles the program and the call f(input) (compiling runs nothing) and sends
      the marshalled code to a sandboxed child, which only unmarshals and runs it;
    - the child answers with a literal repr, which the host parses with a restricted literal
      parser (`parse_literal`), never with eval.
  operating-system layer (sandbox.py, in the child): a fresh process per call, forked from a warm
    server, with an import guard, resource limits, no new processes, no stdin, an empty
    environment, as root a uid drop, and private namespaces (no network, its own process ids, a
    read-only file system with the home folder hidden): as root, or as an ordinary user inside a
    user namespace where the kernel allows one. The Executor prints the layers in place once, at
    start-up (`Executor.layers`). How each of these works is sandbox.py's docstring.

This file imports sandbox.py (its Server, the job format and the two rules both layers apply:
which modules may be imported, how long a message may be), never the other way: the servers run
sandbox.py alone, and what they need of this file's lists and caps goes to them in their
configuration (Executor.__init__).

Determinism is checked in two interpreters started with different PYTHONHASHSEED values, so hash(),
string-set order and the like differ between the two runs. So do addresses (id()): each server is
a process of its own, laid out by the kernel's address-space randomisation (on by default in Linux).
With it off (`setarch -R`), the two children of identical servers can give the same id() values and
an id()-dependent program passes; random padding allocated before each fork did not fix that here
(free lists hand out recently freed blocks first) and cost 50 page faults a call, so there is none.

What is NOT covered: this is not a security boundary against a determined attacker. A kernel
exploit, a bug in CPython, or a side channel gets out. Without root (a student's laptop) there is no
uid drop: a program runs as the user, in a user namespace where the kernel allows one; where it
refuses one (the start-up line says so), a program that slips past the static check could signal
the user's own processes, read the user's files or open network connections. For untrusted code at
scale, run the whole trainer in a container or under nsjail/gVisor; that is the next step.

Departures from the official code: a fork server instead of a process pool that evals in the
trainer; different hash seeds for the determinism check (the official code reruns in one
interpreter, which misses hash-order nondeterminism); the banned list is longer.
"""
from __future__ import annotations

import ast
import functools
import math
import os
import queue
import re
import threading
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sandbox import Server, make_job, module_allowed, shorten

# --------------------------------------------------------------------------------------------------
# Records and limits
# --------------------------------------------------------------------------------------------------

STATUSES = ("ok", "error", "timeout", "memory", "crash", "rejected",
            "unserializable", "output_limit", "nondeterministic")


@dataclass
class RunResult:
    status: str          # one of STATUSES
    value: str | None    # repr of f(input) when status == "ok": a Python literal
    error: str | None    # short human-readable reason otherwise
    seconds: float       # wall time of the call(s), as measured by the server


MAX_PROGRAM_CHARS = 20_000      # a task program; CRUXEval's longest is 278 characters
MAX_INPUT_CHARS = 5_000         # the argument text
MAX_VALUE_CHARS = 20_000        # the repr of a return value
MAX_VALUE_DEPTH = 50            # nesting of a return value
MAX_VALUE_ITEMS = 100_000       # objects inside a return value
MAX_LITERAL_CHARS = 100_000     # what parse_literal / same_value accept
MAX_ERROR_CHARS = 300           # an error message

# The paper's list (logging, random, multiprocessing, pebble, subprocess, threading, datetime, time,
# hashlib, hmac, bcrypt, os.sys, os.path, sys.exit, os.environ, calendar), with os and sys banned
# whole, plus every module that reaches the machine, the interpreter's internals or randomness.
BANNED_MODULES: tuple[str, ...] = (
    "os", "sys", "subprocess", "shutil", "socket", "ssl", "select", "selectors", "signal",
    "ctypes", "cffi", "mmap", "fcntl", "resource", "posix", "pty", "tty", "termios", "pwd", "grp",
    "importlib", "pkgutil", "zipimport", "runpy", "builtins", "__future__", "types", "code",
    "codeop", "inspect", "gc", "weakref", "atexit", "faulthandler", "tracemalloc", "traceback",
    "pdb", "sysconfig", "site", "platform", "io", "pathlib", "tempfile", "glob", "fileinput",
    "shelve", "pickle", "marshal", "dbm", "sqlite3", "zipfile", "tarfile", "asyncio", "threading",
    "_thread", "multiprocessing", "concurrent", "pebble", "sched", "logging", "random", "secrets",
    "uuid", "time", "datetime", "calendar", "zoneinfo", "hashlib", "hmac", "bcrypt", "urllib",
    "http", "ftplib", "smtplib", "webbrowser", "xmlrpc", "email",
)

# Modules a program may import. They are imported by the server before any child forks, because a
# child that dropped root may not be able to read the standard library any more, and because the
# child's importer is switched off (a program cannot load code from disk).
ALLOWED_MODULES: tuple[str, ...] = (
    "math", "cmath", "itertools", "functools", "operator", "collections", "collections.abc",
    "heapq", "bisect", "string", "re", "copy", "fractions", "decimal", "statistics", "numbers",
    "typing", "dataclasses", "enum", "array", "textwrap", "unicodedata", "json", "keyword",
    "difflib", "struct", "base64", "binascii", "abc", "contextlib", "pprint", "reprlib",
)

BANNED_BUILTINS = frozenset({
    "__import__", "eval", "exec", "compile", "open", "input", "globals", "locals", "vars",
    "breakpoint", "exit", "quit", "help", "memoryview", "getattr", "setattr", "delattr",
})

# Dunder names a program may use: harmless ones that real code (and model code) uses.
ALLOWED_DUNDERS = frozenset({
    "__init__", "__name__", "__doc__", "__len__", "__str__", "__repr__", "__eq__", "__ne__",
    "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__iter__", "__next__", "__getitem__",
    "__setitem__", "__contains__", "__add__", "__sub__", "__mul__", "__call__", "__post_init__",
    "__bool__", "__slots__", "__main__",
})
# Non-dunder attributes that reach frames, code objects and globals.
BANNED_ATTRIBUTES = frozenset({
    "f_globals", "f_locals", "f_builtins", "f_back", "f_code", "tb_frame", "tb_next", "gi_frame",
    "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code", "co_code", "func_globals",
    "attrgetter", "methodcaller", "mro",
})
_DUNDER_IN_TEXT = re.compile(r"__[A-Za-z]\w*__")
# This file and sandbox.py: the environment and the jail are no program's to import (the servers
# have sandbox.py loaded).
_OWN_MODULES = (__name__.split(".")[0], "sandbox")
_REFUSED_MODULES = BANNED_MODULES + _OWN_MODULES


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _module_allowed(name: str) -> bool:
    """Banned modules, private ones (_thread, _posixsubprocess, __main__, ...), and executor.py
    and sandbox.py themselves (_OWN_MODULES) are refused. The rule is sandbox.module_allowed, which
    the import guard applies in the child too."""
    return module_allowed(name, _REFUSED_MODULES)


def _escape_attributes() -> frozenset[str]:
    """Attribute names under which an allowed module holds a banned one (typing.sys,
    dataclasses.inspect, ...): reading them would hand the program a banned module."""
    import importlib
    import types
    names = set(BANNED_MODULES)
    for module_name in ALLOWED_MODULES:
        module = importlib.import_module(module_name)
        for attr, value in vars(module).items():
            if isinstance(value, types.ModuleType) and not _module_allowed(value.__name__):
                names.add(attr)
    return frozenset(names)


# --------------------------------------------------------------------------------------------------
# Static safety check (the paper's check 2)
# --------------------------------------------------------------------------------------------------

@dataclass
class _Scope:
    """A module, function, lambda or comprehension seen by the safety check. Its bound names are
    collected only when a banned builtin's name is read in it, which ordinary programs never do."""
    body: list[ast.AST] | ast.AST
    args: ast.arguments | None

    @functools.cached_property
    def names(self) -> set[str]:
        return _SafetyVisitor.bound_names(self.body, self.args)


class _SafetyVisitor(ast.NodeVisitor):
    """Walks a module and records rule violations.

    A banned builtin is flagged where its name is *read* and not bound by the program: so
    `x = eval` is caught, while `def f(input): return input[::-1]` is allowed (the parameter
    shadows the builtin). Scopes are tracked per function, lambda and comprehension.
    """

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.scopes: list[_Scope] = []

    def flag(self, node: ast.AST, message: str) -> None:
        line = getattr(node, "lineno", None)
        self.violations.append(f"line {line}: {message}" if line else message)

    # names bound in one scope: parameters, assignment targets, defs, imports, loop variables;
    # nested functions, lambdas and comprehensions are scopes of their own and are not entered
    @staticmethod
    def bound_names(body: list[ast.AST] | ast.AST, args: ast.arguments | None = None) -> set[str]:
        names: set[str] = set()
        if args is not None:
            for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if a is not None:
                    names.add(a.arg)
        stack = list(body) if isinstance(body, list) else [body]
        while stack:
            node = stack.pop()
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                stack.extend(node.decorator_list)
                continue
            if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                continue
            stack.extend(ast.iter_child_nodes(node))
        return names

    def visit_Module(self, node: ast.Module) -> None:
        self._visit_scope(node, node.body, None)

    def _visit_scope(self, node: ast.AST, body, args) -> None:
        self.scopes.append(_Scope(body, args))
        self.generic_visit(node)
        self.scopes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_scope(node, node.body, node.args)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_scope(node, node.body, node.args)

    def visit_ListComp(self, node) -> None:
        self._visit_scope(node, [g.target for g in node.generators], None)

    visit_SetComp = visit_DictComp = visit_GeneratorExp = visit_ListComp

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.check_module(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self.flag(node, "relative imports are not allowed")
        self.check_module(node, node.module or "")
        for alias in node.names:   # `from typing import sys`, `from re import _compiler`, `import *`
            if alias.name == "*" or alias.name.startswith("_") or alias.name in _ESCAPE_ATTRIBUTES:
                self.flag(node, f"'from {node.module} import {alias.name}' is not allowed")

    def check_module(self, node: ast.AST, name: str) -> None:
        if not _module_allowed(name):
            self.flag(node, f"module '{name}' is forbidden")

    def visit_Name(self, node: ast.Name) -> None:
        if _is_dunder(node.id) and node.id not in ALLOWED_DUNDERS:
            self.flag(node, f"name '{node.id}' is forbidden")
        elif node.id in BANNED_BUILTINS and isinstance(node.ctx, ast.Load):
            if not any(node.id in scope.names for scope in self.scopes):
                self.flag(node, f"builtin '{node.id}' is forbidden")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if ((_is_dunder(node.attr) and node.attr not in ALLOWED_DUNDERS) or node.attr in BANNED_ATTRIBUTES
                or node.attr in _ESCAPE_ATTRIBUTES):
            self.flag(node, f"attribute '.{node.attr}' is forbidden")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        # "{0.__class__}".format(x) reads attributes through a format string.
        if isinstance(node.value, str):
            for name in _DUNDER_IN_TEXT.findall(node.value):
                if name not in ALLOWED_DUNDERS:
                    self.flag(node, f"string mentions '{name}'")
                    break


_ESCAPE_ATTRIBUTES = _escape_attributes()

# Compiling model-written text can warn ('"is" with a literal', an invalid escape): that is the
# program's business, not the trainer's, so those warnings are silenced, for these file names only.
warnings.filterwarnings("ignore", module=r"<(program|input|literal)>\Z")


def _parse(source: str, filename: str, mode: str = "exec") -> ast.AST:
    """ast.parse that turns every failure (deep nesting, memory, null bytes) into SyntaxError."""
    try:
        return ast.parse(source, filename, mode)
    except SyntaxError:
        raise
    except (ValueError, RecursionError, MemoryError) as exc:
        raise SyntaxError(f"{type(exc).__name__}: {exc}") from None


def safety_violations(program: str) -> list[str]:
    """The static safety check. Returns the rules the program breaks; [] means allowed."""
    if len(program) > MAX_PROGRAM_CHARS:
        return [f"program is longer than {MAX_PROGRAM_CHARS} characters"]
    try:
        tree = _parse(program, "<program>")
    except SyntaxError as exc:
        return [f"does not parse: {exc.msg}"]
    return _tree_violations(tree)


def _tree_violations(tree: ast.AST) -> list[str]:
    visitor = _SafetyVisitor()
    visitor.visit(tree)
    return visitor.violations


def _call_source(input_str: str) -> str:
    return f"f({input_str}\n)"   # newline: a trailing comment in the input cannot eat the ')'


def _prepare(program: str, input_str: str, check_safety: bool) -> RunResult | bytes:
    """Everything the host decides before anything runs: size, syntax, safety of program and input.
    Returns the RunResult when the job cannot run, else the job for the child: the program and the
    call f(input) compiled here (make_job). Compiling in the host, once, spares both children
    the parser and compiler, which cost about 0.6 ms of a call in a fresh fork (every page they
    touch is a copy-on-write fault). compile() only translates; nothing of the program runs here."""
    if not isinstance(program, str) or not isinstance(input_str, str):
        return RunResult("error", None, "program and input must be strings", 0.0)
    if len(program) > MAX_PROGRAM_CHARS:
        return RunResult("rejected", None, f"program is longer than {MAX_PROGRAM_CHARS} characters", 0.0)
    if len(input_str) > MAX_INPUT_CHARS:
        return RunResult("rejected", None, f"input is longer than {MAX_INPUT_CHARS} characters", 0.0)
    try:
        program_tree = _parse(program, "<program>")
    except SyntaxError as exc:
        return RunResult("error", None, _short(f"SyntaxError: {exc.msg} (line {exc.lineno})"), 0.0)
    try:
        call_tree = _parse(_call_source(input_str), "<input>", mode="eval")
    except SyntaxError:
        call_tree = None
    call = getattr(call_tree, "body", None)
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "f"):
        return RunResult("error", None, _short(f"input is not a valid argument list: {input_str!r}"), 0.0)
    if check_safety:
        violations = []
        for tree, what in ((program_tree, "program"), (ast.Module(body=[ast.Expr(call)], type_ignores=[]), "input")):
            violations += [f"{what}: {v}" for v in _tree_violations(tree)]
        if violations:
            return RunResult("rejected", None, _short("; ".join(violations)), 0.0)
    try:
        # Errors found only by the compiler ('return' outside function, ...) are the program's.
        # dont_inherit: this file's own `from __future__ import annotations` must not apply.
        code = compile(program_tree, "<program>", "exec", dont_inherit=True)
        call_code = compile(call_tree, "<input>", "eval", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        message = exc.msg if isinstance(exc, SyntaxError) else f"{type(exc).__name__}: {exc}"
        return RunResult("error", None, _short(f"SyntaxError: {message}"), 0.0)
    return make_job(code, call_code)


def _short(text: str) -> str:
    return shorten(text, MAX_ERROR_CHARS)


# --------------------------------------------------------------------------------------------------
# Literal values: parsing and comparison on the host (never eval)
# --------------------------------------------------------------------------------------------------

_LITERAL_NAMES = {"True": True, "False": False, "None": None,
                  "inf": math.inf, "nan": math.nan}


def parse_literal(text: str):
    """Parse a literal repr as the child writes it (ast.literal_eval plus inf, nan, set(),
    frozenset({...})), with a size cap. Raises ValueError on anything else."""
    if not isinstance(text, str) or len(text) > MAX_LITERAL_CHARS:
        raise ValueError("not a string or too long")
    try:
        tree = _parse(text.strip(), "<literal>", mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not a literal: {exc.msg}") from None

    def build(node: ast.AST):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
            return _LITERAL_NAMES[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = build(node.operand)
            if type(operand) in (int, float, complex):
                return -operand if isinstance(node.op, ast.USub) else +operand
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            left, right = build(node.left), build(node.right)   # complex numbers: 1+2j
            if type(left) in (int, float) and type(right) is complex:
                return left + right if isinstance(node.op, ast.Add) else left - right
        if isinstance(node, ast.List):
            return [build(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(build(e) for e in node.elts)
        if isinstance(node, ast.Set):
            return {build(e) for e in node.elts}
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {build(k): build(v) for k, v in zip(node.keys, node.values)}
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords
                and node.func.id in ("set", "frozenset") and len(node.args) <= 1):
            items = build(node.args[0]) if node.args else ()
            if isinstance(items, (set, list, tuple, frozenset)):
                return set(items) if node.func.id == "set" else frozenset(items)
        raise ValueError(f"not a literal: {ast.dump(node)[:80]}")

    try:
        return build(tree.body)
    except (TypeError, RecursionError, MemoryError) as exc:   # e.g. an unhashable set element
        raise ValueError(f"not a literal: {type(exc).__name__}") from None


def _equal(a, b) -> bool:
    """Python's == (so 1 == 1.0 == True, as in CRUXEval's assert f(x) == y), except that NaN
    equals NaN, also inside containers."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except RecursionError:
        return False


def same_value(a: str, b: str) -> bool:
    """True when two literal reprs denote equal values. Text that does not parse is never equal."""
    try:
        return _equal(parse_literal(a), parse_literal(b))
    except (ValueError, RecursionError):
        return False


# --------------------------------------------------------------------------------------------------
# The Executor: the environment as the loop sees it (its processes are sandbox.py's)
# --------------------------------------------------------------------------------------------------

HASH_SEEDS = (1, 2)   # fixed, so a run is reproducible; different, so validate() sees hash order


class Executor:
    """Runs and validates model-written programs in sandboxed child processes.

    Use as a context manager (or call close()): it starts 2 x workers warm server processes, the
    first at once (it prints the jail's layers, once per process), the others on first use.
    `check_safety=False` skips the static check and the import guard; it exists so the tests can
    attack the operating-system layer directly. Never use it for model output.
    """

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 10_000,
                 workers: int | None = None, check_safety: bool = True) -> None:
        if timeout_s <= 0 or memory_mb < 64 or max_output_chars < 0:
            raise ValueError("need timeout_s > 0, memory_mb >= 64 and max_output_chars >= 0")
        self.limits = {"timeout_s": float(timeout_s), "memory_mb": int(memory_mb),
                       "max_output_chars": int(max_output_chars)}
        self.check_safety = check_safety
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.calls = 0                          # child processes run (a validate() is two)
        self.statuses: Counter[str] = Counter()  # status of every result run() / validate() returned
        self._lock = threading.Lock()
        self._slots: queue.SimpleQueue[tuple[Server, Server]] = queue.SimpleQueue()
        self._servers: list[Server] = []
        # What the servers need of this file's rules travels with them: sandbox.py imports nothing of
        # this project (its serve() says what each entry is for).
        config = {"limits": self.limits, "check_safety": check_safety,
                  "allowed_modules": ALLOWED_MODULES, "refused_modules": _REFUSED_MODULES, "statuses": STATUSES,
                  "caps": {"value_items": MAX_VALUE_ITEMS, "value_depth": MAX_VALUE_DEPTH,
                           "value_chars": MAX_VALUE_CHARS, "error_chars": MAX_ERROR_CHARS}}
        for _ in range(self.workers):
            pair = (Server(HASH_SEEDS[0], config), Server(HASH_SEEDS[1], config))
            self._servers += pair
            self._slots.put(pair)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="executor")
        self._closed = False
        self._servers[0].start()                # announces the jail's layers (sandbox.py) at start-up

    # the public calls ------------------------------------------------------------------------------

    def run(self, program: str, input_str: str) -> RunResult:
        """One call of f(*input) in a fresh sandboxed child."""
        return self._with_slot(lambda pair: self._run_on(pair[0], program, input_str))

    def validate(self, program: str, input_str: str) -> RunResult:
        """The paper's three checks (see _validate_on). Status "ok" carries the output.

          1. integrity   - program and call parse and compile, and the call returns in time;
          2. safety      - the static check (safety_violations) of program and input, then the
                           import guard in the child (sandbox.py);
          3. determinism - the call gives an equal value (same_value) under the other hash seed.
        """
        return self._with_slot(lambda pair: self._validate_on(pair, program, input_str))

    def run_many(self, jobs: list[tuple[str, str]]) -> list[RunResult]:
        return list(self._pool.map(lambda job: self.run(*job), jobs))

    def validate_many(self, jobs: list[tuple[str, str]]) -> list[RunResult]:
        return list(self._pool.map(lambda job: self.validate(*job), jobs))

    @property
    def isolated(self) -> bool:
        """True when the servers run in private namespaces (no network, own process ids, hidden home):
        as root, or as a user where the kernel allows user namespaces."""
        return all(s.isolated for s in self._servers if s.proc is not None)

    @property
    def servers(self) -> tuple[Server, ...]:
        """The warm servers (sandbox.Server), two per worker, started or not: what the tests kill,
        stop and look for."""
        return tuple(self._servers)

    @property
    def layers(self) -> tuple[str, ...]:
        """The jail's layers in place, as the servers reported them when they started (those all of
        them reported): the static check and import guard (unless check_safety is off), resource
        limits, and the namespaces where the kernel allows them. Printed once at start-up."""
        reported = [s.layers for s in self._servers if s.layers is not None]
        return tuple(layer for layer in reported[0] if all(layer in other for other in reported))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        for server in self._servers:
            server.stop()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # internals ---------------------------------------------------------------------------------------

    def _with_slot(self, work) -> RunResult:
        if self._closed:
            raise RuntimeError("this Executor is closed")
        pair = self._slots.get()
        try:
            result = work(pair)
        except BaseException:                  # Ctrl-C: an unread reply must not reach the next call
            for server in pair:
                server.stop()
            raise
        finally:
            self._slots.put(pair)
        with self._lock:
            self.statuses[result.status] += 1
        return result

    def _count_calls(self, runs: int) -> None:
        with self._lock:
            self.calls += runs

    def _run_on(self, server: Server, program: str, input_str: str) -> RunResult:
        job = _prepare(program, input_str, self.check_safety)
        if isinstance(job, RunResult):                  # rejected or broken: nothing runs
            return job
        self._count_calls(1)
        return RunResult(**server.call(job))

    def _validate_on(self, pair: tuple[Server, Server], program: str, input_str: str) -> RunResult:
        # 1. integrity, first half (parses, compiles) and 2. safety (the static check): in the host
        job = _prepare(program, input_str, self.check_safety)
        if isinstance(job, RunResult):
            return job
        # Both hash seeds at once: the two children run side by side, and the second run costs
        # little more wall time than the first.
        self._count_calls(2)
        for server in pair:
            server.send(job)
        first, second = (RunResult(**server.receive()) for server in pair)
        # 1. integrity, second half: the call returns a value within the limits, in both runs
        if first.status != "ok":
            return first
        seconds = first.seconds + second.seconds
        if second.status != "ok":
            return RunResult(second.status, None, second.error, seconds)
        # 3. determinism: both runs give the same value
        if not same_value(first.value, second.value):
            return RunResult("nondeterministic", None,
                             _short(f"run 1 gave {first.value}, run 2 gave {second.value}"), seconds)
        return RunResult("ok", first.value, None, seconds)


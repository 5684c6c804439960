"""The code executor: AZR's environment.

In the paper (Sec. 3.2, "the environment"), a Python executor turns every proposal into a checked
task and grades every answer. A proposal (program p, input i) is kept only if it passes three checks:

  1. integrity   - p parses, p(i) runs without error and returns within the time limit;
  2. safety      - p uses no forbidden module (the paper's list, extended here, see BANNED_MODULES);
  3. determinism - two runs give the same output.

`Executor.validate` is those three checks; `Executor.run` is one call of f(*input), used to grade
answers (Eq. 5). The model is rewarded for finding weak spots, so it will write hostile programs.
The official code runs model strings in the trainer's own process; this file does not.

How one call runs (two layers):

  language layer (host and child):
    - a static AST check before anything runs: banned modules, banned builtins (eval, exec, open, ...),
      dunder attributes used to climb out (__class__, __globals__, ...), frame attributes; the
      input text is checked the same way, as the argument list of a call f(...);
    - the host then compiles the program and the call f(input) (compiling runs nothing) and sends
      the marshalled code; the child only unmarshals and runs it;
    - in the child, imports are limited to modules loaded before the call (no new module is read
      from disk) and banned modules are refused even when already loaded.
  operating-system layer (child):
    - a fresh process per call, forked from a warm server that has the allowed modules imported
      (about 1 ms, against about 35 ms for a new interpreter), in its own session, SIGKILLed with
      its whole process group at the deadline. A fork costs in proportion to the server's memory,
      and every page the child writes costs a copy-on-write fault, so the server stays small and
      prepares once what every child needs (limits, import guard); see _serve and _child_main;
    - resource limits: address space, CPU time, file size (which also caps captured output),
      no core files, and no new processes (RLIMIT_NPROC = 0; the kernel ignores it for root, so a
      root child first drops to the uid "nobody");
    - stdin from /dev/null, stdout/stderr captured into capped in-memory files, an empty
      environment, a fresh working directory removed afterwards;
    - when the server runs as root it also enters a private network namespace (no network at all)
      and a private mount namespace with a fresh tmpfs on /tmp, /var/tmp and /dev/shm, so files a
      program writes there never reach the real machine;
    - the return value is turned into a literal repr inside the child (exact builtin types only,
      with caps on depth, element count and size); the host only ever sees that string and parses
      it with a restricted literal parser (`parse_literal`), never with eval.

Determinism is checked in two interpreters started with different PYTHONHASHSEED values, so hash(),
string-set order and the like differ between the two runs. So do addresses (id()): each server is
a process of its own, laid out by the kernel's address-space randomisation (on by default in Linux).
With it off (`setarch -R`), the two children of identical servers can give the same id() values and
an id()-dependent program passes; random padding allocated before each fork did not fix that here
(free lists hand out recently freed blocks first) and cost 50 page faults a call, so there is none.

What is NOT covered: this is not a security boundary against a determined attacker. A kernel
exploit, a bug in CPython, or a side channel gets out. Without root (a student's laptop) there is no
uid drop and no namespaces, so a program that slips past the static check could signal the user's
own processes, read the user's files or open network connections. For untrusted code at scale,
run the whole trainer in a container or under nsjail/gVisor; that is the next step.

Departures from the official code: a fork server instead of a process pool that evals in the
trainer; different hash seeds for the determinism check (the official code reruns in one
interpreter, which misses hash-order nondeterminism); the banned list is longer.
"""
from __future__ import annotations

import ast
import builtins
import functools
import json
import marshal
import math
import os
import re
import resource
import select
import signal
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

# This file is also the warm server's program, and every module the server imports makes each of
# its forks slower: `threading` alone (imported by subprocess, queue and concurrent.futures) runs an
# after-fork hook that cost 0.35 ms of a 0.9 ms fork here. The host-only modules are therefore
# imported where the host uses them (_Server.start, Executor.__init__), never at the top.

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
_THIS_MODULE = __name__.split(".")[0]


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _module_allowed(name: str) -> bool:
    """Banned modules, private ones (_thread, _posixsubprocess, __main__, ...) and this executor
    itself (its servers have it loaded) are refused."""
    parts = name.split(".")
    return parts[0] not in BANNED_MODULES and parts[0] != _THIS_MODULE and not any(p.startswith("_") for p in parts)


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
    call f(input) compiled here and marshalled. Compiling in the host, once, spares both children
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
    return marshal.dumps((code, call_code))


def _short(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
# The child: runs inside a forked process of a server (never in the host)
# --------------------------------------------------------------------------------------------------

_EXACT_LITERAL_TYPES = (type(None), bool, int, float, complex, str, bytes)
_EXACT_CONTAINER_TYPES = (list, tuple, set, frozenset, dict)


def _to_literal(value) -> tuple[str, str]:
    """(status, text): the repr of a value made of exact builtin types, or why it is not one.
    Exact types only: a subclass of int or str could lie in __repr__ or __eq__."""
    stack, items = [(value, 0)], 0
    while stack:
        obj, depth = stack.pop()
        items += 1
        if items > MAX_VALUE_ITEMS:
            return "unserializable", f"return value has more than {MAX_VALUE_ITEMS} items"
        if depth > MAX_VALUE_DEPTH:
            return "unserializable", f"return value is nested deeper than {MAX_VALUE_DEPTH}"
        kind = type(obj)
        if kind in _EXACT_LITERAL_TYPES:
            continue
        if kind not in _EXACT_CONTAINER_TYPES:
            return "unserializable", f"return value contains a {kind.__name__!r}, not a builtin literal type"
        children = list(obj.items()) if kind is dict else obj
        stack.extend((child, depth + 1) for child in children)
    try:
        text = repr(value)
    except ValueError as exc:   # ints with more than sys.get_int_max_str_digits() digits
        return "unserializable", _short(f"repr failed: {exc}")
    if len(text) > MAX_VALUE_CHARS:
        return "unserializable", f"return value repr is longer than {MAX_VALUE_CHARS} characters"
    return "ok", text


def _child_main(config: dict, job_fd: int, result_fd: int, out_fd: int, err_fd: int, workdir: str) -> None:
    """Set up the jail, wait for the job, run f(*input), write the result to result_fd. The child is
    forked before its job arrives (see _Child), so the first half of the setup costs no latency.
    Every line here runs once per call, in a fresh copy of the server, and each page of memory it
    writes to costs a copy-on-write fault (about 5 us here): the setup is a few system calls, and
    all that can be prepared once (limits, import guard) is prepared by the server."""
    try:
        os.setsid()                                    # own session: killpg reaches all it starts
        os.dup2(_devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        low, high = sorted((job_fd, result_fd))        # both above 2: the server's 0, 1, 2 are open
        os.closerange(3, low)                          # drop the server's protocol pipes
        os.closerange(low + 1, high)
        os.closerange(high + 1, _max_fd)
        os.chdir(workdir)
        for which, limit in config["rlimits"]:
            resource.setrlimit(which, limit)
        # Blocks until the server hands over a job; if the server dies first, this reads EOF and
        # the child exits, so PDEATHSIG is needed only from here on.
        code, call_code = marshal.loads(_read_all(job_fd))   # compiled by the host (_prepare)
        os.close(job_fd)
        # Root is dropped only now, so that no idle child ever runs as "nobody": after a call, a
        # process of that uid can only be a program's leftover (the tests look for them).
        if os.getuid() == 0:                           # RLIMIT_NPROC does not bind root
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
        _die_with_parent()                             # after setuid, which would clear it
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except BaseException as exc:                       # the jail failed: never run the program
        _child_write(result_fd, "crash", f"sandbox setup failed: {exc!r}")
        return

    write, encode, exit_now = os.write, str.encode, os._exit   # before the program can patch os
    namespace = {"__name__": "__azr_task__", "__builtins__": builtins}
    try:
        exec(code, namespace)
        if not callable(namespace.get("f")):
            status, text = "error", "NameError: the program defines no function f"
        else:
            value = eval(call_code, namespace)
            status, text = _to_literal(value)
    except MemoryError:
        status, text = "memory", "MemoryError"
    except BaseException as exc:                       # SystemExit and KeyboardInterrupt too
        status, text = "error", _describe(exc)
    _child_write(result_fd, status, text, write, encode)   # prints are already written (python -u)
    exit_now(0)


def _read_all(fd: int) -> bytes:
    chunks = []
    while data := os.read(fd, 65536):
        chunks.append(data)
    return b"".join(chunks)


def _describe(exc: BaseException) -> str:
    """'TypeError: message' without trusting the exception's own __str__ to behave."""
    name = type(exc).__name__ if isinstance(type(exc).__name__, str) else "Exception"
    try:
        message = str(exc)
    except BaseException:
        message = "<unprintable message>"
    return _short(f"{name}: {message}" if message else name)


def _child_write(fd: int, status: str, text: str, write=os.write, encode=str.encode) -> None:
    """Send "status\ntext" to the server. Plain str.encode, not json: a program may import json
    and patch it, but it cannot patch a builtin type's method."""
    data = encode(f"{status}\n{text}", "utf-8", "replace")
    while data:
        data = data[write(fd, data):]


# --------------------------------------------------------------------------------------------------
# The server: a warm interpreter (one hash seed) that forks one child per call
# --------------------------------------------------------------------------------------------------

_NOBODY = 65534
# Set up once per server by _server_setup(): the children's stdin, the file descriptor limit (a
# child closes everything below it that it does not need), and a root-only folder (0711: "nobody"
# can enter its own subfolder but not list or create anything) for the working directories, which
# are numbered by _run_count.
_devnull = -1
_max_fd = 0
_run_root = ""
_run_count = 0


def _libc():
    """The C library through ctypes (prctl, unshare, mount, malloc_trim); None where there is none."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


_prctl = None   # loaded once per server: dlopen in every child would cost 0.3 ms a call


def _die_with_parent() -> None:
    """Linux prctl(PR_SET_PDEATHSIG, SIGKILL): no child outlives its server, no server its host."""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL, 0, 0, 0)


def _enter_private_namespaces() -> bool:
    """As root: no network, and a private tmpfs on the world-writable directories. Best effort."""
    libc = _libc()
    if os.getuid() != 0 or libc is None:
        return False
    try:
        clone_newns, clone_newnet, ms_rec, ms_private = 0x00020000, 0x40000000, 0x4000, 0x40000
        if libc.unshare(clone_newns | clone_newnet) != 0:
            return False
        if libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0:
            return False
        for path in (b"/tmp", b"/var/tmp", b"/dev/shm"):
            if os.path.isdir(path):
                libc.mount(b"tmpfs", path, b"tmpfs", 0, b"size=256m,mode=1777")
        return True
    except Exception:
        return False


def _server_setup() -> bool:
    """Once per server, before the first fork: namespaces, folders, and every module a child may use.
    Returns whether the private namespaces are in place."""
    import importlib
    global _prctl, _devnull, _max_fd, _run_root
    _prctl = getattr(_libc(), "prctl", None)             # None: not Linux
    _die_with_parent()
    isolated = _enter_private_namespaces()
    _devnull = os.open(os.devnull, os.O_RDONLY)
    _max_fd = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    _run_root = f"{os.environ.get('TMPDIR', '/tmp')}/azr-run-{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(_run_root)
    os.chmod(_run_root, 0o711)
    import encodings
    import pkgutil
    # Every text codec too: Python loads them on first use (CRUXEval has "abc".encode("shift_jis")).
    # Not the two that need compression libraries: str.encode cannot use them, and each library
    # mapped into the server makes every fork slower.
    codecs = [m.name for m in pkgutil.iter_modules(encodings.__path__) if m.name not in ("bz2_codec", "zlib_codec")]
    for module in ALLOWED_MODULES + tuple(f"encodings.{name}" for name in codecs):
        try:
            importlib.import_module(module)
        except Exception:
            pass
    os.environ.clear()                                  # children inherit an empty environment
    return isolated


def _release_free_memory() -> None:
    """Hand the memory the setup freed back to the system. A fork copies the page table entries of
    every mapped page, and the child's exit tears them down: here each megabyte of the server costs
    about 0.1 ms per call."""
    import gc
    gc.collect()
    malloc_trim = getattr(_libc(), "malloc_trim", None)   # None: not glibc
    if malloc_trim is not None:
        malloc_trim(0)


def _child_rlimits(limits: dict) -> list[tuple[int, tuple[int, int]]]:
    """The resource limits every child sets on itself (RLIMIT_NPROC comes after the uid drop)."""
    memory = limits["memory_mb"] * 1024 * 1024
    cpu_s = int(math.ceil(limits["timeout_s"])) + 1   # a backstop: the server's deadline comes first
    output = limits["max_output_chars"] + 1           # also caps the captured stdout and stderr
    return [(resource.RLIMIT_AS, (memory, memory)), (resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),
            (resource.RLIMIT_FSIZE, (output, output)), (resource.RLIMIT_CORE, (0, 0))]


def _install_import_guard() -> None:
    """From here on no module is read from disk, and a banned module is refused even when it is
    loaded. Installed in the server once its own imports are done; every child inherits it."""
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if not _module_allowed(name) or level:
            raise ImportError(f"import of '{name}' is not allowed")
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded_import
    sys.meta_path[:] = []
    sys.path[:] = []


def _serve(config_json: str) -> None:
    """Server loop. A job is its length on a line, then that many bytes: the marshalled code from
    _prepare, passed to the child as it came. Each reply is one JSON line. config holds the
    Executor's limits and check_safety, the same for every job."""
    config = json.loads(config_json)
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)        # a stray print never corrupts the protocol
    isolated = _server_setup()
    config = dict(config, rlimits=_child_rlimits(config["limits"]))
    _Child(config).run(_prepare("def f(a):\n    return a", "'warm'", True))   # the first fork is slow
    _release_free_memory()
    import gc
    gc.freeze()                                         # fewer copy-on-write page faults per fork
    if config["check_safety"]:
        _install_import_guard()
    replies.write(json.dumps({"ready": True, "isolated": isolated, "run_root": _run_root}).encode() + b"\n")
    child = _Child(config)
    for header in requests:
        reply = child.run(requests.read(int(header)))
        replies.write(json.dumps(reply).encode() + b"\n")
        child = _Child(config)                          # forked while the host reads the reply


def _capture_file(name: str) -> int:
    """An anonymous file for a child's stdout or stderr: in memory, with no name anyone could open."""
    try:
        return os.memfd_create(name)
    except (AttributeError, OSError):                   # not Linux: an unlinked file instead
        path = f"{_run_root}/{name}-{_run_count}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(path)
        return fd


def _remove_tree(path: str) -> None:
    """Remove a working directory and whatever the program left in it. Links are removed, never
    followed."""
    for folder, dirs, files in os.walk(path, topdown=False):
        for name in files + dirs:
            target = os.path.join(folder, name)
            try:
                if name in dirs and not os.path.islink(target):
                    os.rmdir(target)
                else:
                    os.unlink(target)
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


class _Child:
    """One sandboxed child, forked ahead of its job: fork and most of the jail setup happen while
    the server would otherwise wait for the next request. Used once.

    The server runs this between every two forks, and after a fork each page it writes to costs a
    page fault: it is kept to plain system calls."""

    def __init__(self, config: dict) -> None:
        global _run_count
        self.config = config
        _run_count += 1
        self.workdir = f"{_run_root}/{_run_count}"
        os.mkdir(self.workdir, 0o700)
        if os.getuid() == 0:
            os.chown(self.workdir, _NOBODY, _NOBODY)
        self.out_fd, self.err_fd = _capture_file("stdout"), _capture_file("stderr")
        job_read, self.job_write = os.pipe()
        self.read_fd, result_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:                               # child
            try:
                os.close(self.job_write)
                os.close(self.read_fd)
                _child_main(config, job_read, result_write, self.out_fd, self.err_fd, self.workdir)
            finally:
                os._exit(0)
        os.close(job_read)
        os.close(result_write)

    def run(self, job: bytes) -> dict:
        """Hand the job (from _prepare) over, wait for the child until the deadline, clean up, classify
        the outcome."""
        start = time.monotonic()
        try:
            os.write(self.job_write, job)
        except BrokenPipeError:                         # the child died while waiting: crash below
            pass
        os.close(self.job_write)
        pid, read_fd, out_fd, err_fd = self.pid, self.read_fd, self.out_fd, self.err_fd
        limits = self.config["limits"]
        deadline = start + limits["timeout_s"]
        chunks, size, timed_out, exited, reading = [], 0, False, False, True
        status_word = None
        poller = select.poll()
        poller.register(read_fd, select.POLLIN)
        pidfd = _pidfd(pid)                             # readable once the child has exited
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            wait_s = remaining if pidfd is not None else min(remaining, 0.05)
            for fd, _ in poller.poll(wait_s * 1000):
                if fd == read_fd:
                    data = os.read(read_fd, 65536)
                    if not data:
                        poller.unregister(read_fd)
                        reading = False
                    elif size <= MAX_VALUE_CHARS * 8:
                        chunks.append(data)
                        size += len(data)
                else:
                    exited = True
            if not exited:
                done, word = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    exited, status_word = True, word
            if exited and reading:                      # result still in the pipe: drain it
                os.set_blocking(read_fd, False)
                try:
                    while data := os.read(read_fd, 65536):
                        chunks.append(data)
                except BlockingIOError:
                    pass
            if exited:
                break
        if pidfd is not None:
            os.close(pidfd)
        seconds = time.monotonic() - start
        _kill_group(pid)
        if status_word is None:
            _, status_word = os.waitpid(pid, 0)
        os.close(read_fd)
        out_size = os.fstat(out_fd).st_size
        err_size = os.fstat(err_fd).st_size
        err_tail = os.pread(err_fd, 2000, max(0, err_size - 2000)).decode("utf-8", "replace") if err_size else ""
        os.close(out_fd)
        os.close(err_fd)
        try:
            os.rmdir(self.workdir)                      # the common case: the program wrote nothing
        except OSError:
            _remove_tree(self.workdir)

        cap = limits["max_output_chars"]
        if timed_out:
            return _reply("timeout", None, f"no result within {limits['timeout_s']:g} s", seconds)
        if out_size > cap or err_size > cap:
            return _reply("output_limit", None, f"printed more than {cap} characters", seconds)
        status, _, text = b"".join(chunks).decode("utf-8", "replace").partition("\n")
        if status == "ok":
            return _reply("ok", text, None, seconds)
        if status in STATUSES:
            return _reply(status, None, text, seconds)
        if os.WIFSIGNALED(status_word):
            sig = os.WTERMSIG(status_word)
            if sig == signal.SIGXCPU:
                return _reply("timeout", None, "CPU time limit exceeded", seconds)
            if sig == signal.SIGXFSZ:
                return _reply("output_limit", None, "file size limit exceeded", seconds)
            try:
                reason = f"killed by signal {signal.Signals(sig).name}"
            except ValueError:
                reason = f"killed by signal {sig}"
        else:
            reason = f"exited with code {os.WEXITSTATUS(status_word)} before returning"
        if "MemoryError" in err_tail:
            return _reply("memory", None, "MemoryError", seconds)
        last_line = err_tail.strip().splitlines()[-1:] or [""]
        return _reply("crash", None, _short(f"{reason} {last_line[0]}".strip()), seconds)


def _reply(status, value, error, seconds) -> dict:
    return {"status": status, "value": value, "error": error, "seconds": seconds}


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):                   # old kernel or not Linux: poll instead
        return None


def _kill_group(pid: int) -> None:
    """SIGKILL the child's process group (its session) and the child itself; no SIGTERM grace."""
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# --------------------------------------------------------------------------------------------------
# The host side: a pool of warm servers, two hash seeds per worker
# --------------------------------------------------------------------------------------------------

HASH_SEEDS = (1, 2)   # fixed, so a run is reproducible; different, so validate() sees hash order
_SERVER_GRACE_S = 30.0   # a server that has not answered timeout_s + this after a job hangs


class _Server:
    """One warm interpreter started with one PYTHONHASHSEED, spoken to over pipes."""

    def __init__(self, hash_seed: int, config: dict) -> None:
        self.hash_seed, self.config = hash_seed, config
        self.proc: subprocess.Popen | None = None
        self.isolated = False
        self.run_root: str | None = None

    def start(self) -> None:
        import subprocess
        import tempfile
        env = {"PYTHONHASHSEED": str(self.hash_seed), "PATH": os.defpath, "LC_ALL": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": tempfile.gettempdir()}
        # The server imports this module by name, so it uses the cached bytecode when there is
        # some (compiling the source leaves freed parser memory behind; see _release_free_memory).
        folder, module = os.path.split(os.path.splitext(os.path.abspath(__file__))[0])
        bootstrap = f"import sys; sys.path.insert(0, {folder!r}); import {module}; {module}._serve(sys.argv[1])"
        self.proc = subprocess.Popen(
            # -S: no site-packages and no .pth start-up hooks (one here imports threading);
            # -u: unbuffered stdout and stderr, so a child has nothing to flush before it exits
            [sys.executable, "-S", "-u", "-c", bootstrap, json.dumps(self.config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, cwd="/", start_new_session=True)
        hello = self._read_line(timeout_s=60)
        if hello is None:
            self.stop()
            raise RuntimeError("the executor's server process did not start")
        hello = json.loads(hello)
        self.isolated = bool(hello["isolated"])
        # Outside private namespaces the server's folder is on the real file system: removed in stop()
        self.run_root = None if self.isolated else hello["run_root"]

    def call(self, job: bytes) -> RunResult:
        self.send(job)
        return self.receive()

    def send(self, job: bytes) -> bool:
        """Hand a job to the server (restarted first if it died). False if it could not be sent."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(b"%d\n%s" % (len(job), job))
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def receive(self) -> RunResult:
        """The job's result; a server that died or hangs is stopped and the job counts as a crash."""
        line = None
        if self.proc is not None:
            try:
                line = self._read_line(timeout_s=self.config["limits"]["timeout_s"] + _SERVER_GRACE_S)
            except OSError:
                pass
        if line is None:
            self.stop()
            return RunResult("crash", None, "the executor's server process died; restarted", 0.0)
        reply = json.loads(line)
        return RunResult(reply["status"], reply["value"], reply["error"], reply["seconds"])

    def _read_line(self, timeout_s: float) -> bytes | None:
        stream = self.proc.stdout
        poller = select.poll()
        poller.register(stream, select.POLLIN)
        if not poller.poll(timeout_s * 1000):
            return None
        line = stream.readline()
        return line or None

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc.pid)
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.proc = None
        if self.run_root is not None:
            _remove_tree(self.run_root)
            self.run_root = None


class Executor:
    """Runs and validates model-written programs in sandboxed child processes.

    Use as a context manager (or call close()): it starts 2 x workers warm server processes.
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
        import queue
        import threading
        from concurrent.futures import ThreadPoolExecutor
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.calls = 0                          # child processes run (a validate() is two)
        self.statuses: Counter[str] = Counter()  # status of every result run() / validate() returned
        self._lock = threading.Lock()
        self._slots: queue.SimpleQueue[tuple[_Server, _Server]] = queue.SimpleQueue()
        self._servers: list[_Server] = []
        config = {"limits": self.limits, "check_safety": check_safety}
        for _ in range(self.workers):
            pair = (_Server(HASH_SEEDS[0], config), _Server(HASH_SEEDS[1], config))
            self._servers += pair
            self._slots.put(pair)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="executor")
        self._closed = False

    # the public calls ------------------------------------------------------------------------------

    def run(self, program: str, input_str: str) -> RunResult:
        """One call of f(*input) in a fresh sandboxed child."""
        return self._with_slot(lambda pair: self._run_on(pair[0], program, input_str))

    def validate(self, program: str, input_str: str) -> RunResult:
        """The paper's three checks. Status "ok" carries the output."""
        return self._with_slot(lambda pair: self._validate_on(pair, program, input_str))

    def run_many(self, jobs: list[tuple[str, str]]) -> list[RunResult]:
        return list(self._pool.map(lambda job: self.run(*job), jobs))

    def validate_many(self, jobs: list[tuple[str, str]]) -> list[RunResult]:
        return list(self._pool.map(lambda job: self.validate(*job), jobs))

    @property
    def isolated(self) -> bool:
        """True when the servers run in private network and mount namespaces (needs root)."""
        return all(s.isolated for s in self._servers if s.proc is not None)

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

    def _run_on(self, server: _Server, program: str, input_str: str) -> RunResult:
        job = _prepare(program, input_str, self.check_safety)
        if isinstance(job, RunResult):                  # rejected or broken: nothing runs
            return job
        self._count_calls(1)
        return server.call(job)

    def _validate_on(self, pair: tuple[_Server, _Server], program: str, input_str: str) -> RunResult:
        job = _prepare(program, input_str, self.check_safety)
        if isinstance(job, RunResult):
            return job
        # Both hash seeds at once: the two children run side by side, and the second run costs
        # little more wall time than the first.
        self._count_calls(2)
        for server in pair:
            server.send(job)
        first, second = (server.receive() for server in pair)
        if first.status != "ok":
            return first
        seconds = first.seconds + second.seconds
        if second.status != "ok":
            return RunResult(second.status, None, second.error, seconds)
        if not same_value(first.value, second.value):
            return RunResult("nondeterministic", None,
                             _short(f"run 1 gave {first.value}, run 2 gave {second.value}"), seconds)
        return RunResult("ok", first.value, None, seconds)


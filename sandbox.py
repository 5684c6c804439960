"""The sandbox: how one call of a model-written program is jailed (the operating-system layer).

executor.py is the environment as AZR sees it: the paper's three checks, the limits, the banned and
allowed lists, the static safety check, and the Executor, which sends each call that passes the
static check, compiled (executor._prepare), to a warm server of this file. From there:

  - a fresh process per call, forked from a warm server that has the allowed modules imported
    (about 1 ms, against about 35 ms for a new interpreter), in its own session, SIGKILLed with
    its whole process group at the deadline. A fork costs in proportion to the server's memory,
    and every page the child writes costs a copy-on-write fault, so the server stays small and
    prepares once what every child needs (limits, import guard); see _serve and _child_main;
  - the child only unmarshals the compiled code and runs it; its imports are limited to modules
    loaded before the call (no new module is read from disk), and banned modules are refused
    even when already loaded (_install_import_guard);
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
    it with executor.parse_literal, never with eval.

The file has three parts, from the inside out: the child (runs in a forked process of a server),
the server (a warm interpreter with one hash seed that forks one child per call), and the host
side (_Server: starts one server and speaks to it over pipes; the Executor holds two per worker).
"""
from __future__ import annotations

import builtins
import json
import marshal
import math
import os
import resource
import select
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

# This file is the warm server's program, and every module the server imports makes each of its
# forks slower: `threading` alone (imported by subprocess, queue and concurrent.futures) runs an
# after-fork hook that cost 0.35 ms of a 0.9 ms fork here. The host-only modules are therefore
# imported where the host uses them (_Server.start, Executor.__init__), never at the top of this
# file or of executor.py. executor.py, which has the limits and lists, is loaded here, before the
# server's import guard (which refuses both files to programs); it imports this file only inside
# Executor, so the two never import each other half loaded.
from executor import (ALLOWED_MODULES, MAX_VALUE_CHARS, MAX_VALUE_DEPTH, MAX_VALUE_ITEMS, STATUSES,
                      RunResult, _module_allowed, _prepare, _short)

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
# The host side: one warm server, spoken to over pipes (the Executor holds two per worker)
# --------------------------------------------------------------------------------------------------

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
        # The server imports this module (and so executor.py) by name, so it uses the cached
        # bytecode when there is some (compiling the source leaves freed parser memory behind; see
        # _release_free_memory).
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

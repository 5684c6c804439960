"""The sandbox: how one call of a model-written program is jailed (the operating-system layer).

executor.py is the environment as AZR sees it: the paper's three checks, the limits, the banned and
allowed lists, the static safety check, and the Executor, which sends each call that passes the
static check, compiled (make_job), to a warm server of this file. The import goes one way:
executor.py imports this file, and this file imports only the standard library. What the jail needs
of the environment's rules (the allowed and refused modules, the caps on values and messages, the
statuses) comes in the configuration each server is started with, and each call's result goes
back as plain data (a dict) that executor.py makes its own record. From there:

  - a fresh process per call, forked from a warm server that has the allowed modules imported
    (about 1 ms, against about 35 ms for a new interpreter), in its own session, SIGKILLed with
    its whole process group at the deadline. A fork costs in proportion to the server's memory,
    and every page the child writes costs a copy-on-write fault, so the server stays small and
    prepares once what every child needs (limits, import guard); see serve and _child_main;
  - the child only unmarshals the compiled code and runs it; its imports are limited to modules
    loaded before the call (no new module is read from disk), and banned modules are refused
    even when already loaded (_install_import_guard);
  - resource limits: address space, CPU time, file size (which also caps captured output),
    no core files, and no new processes (RLIMIT_NPROC = 0; the kernel ignores it for root, so a
    root child first drops to the uid "nobody");
  - stdin from /dev/null, stdout/stderr captured into capped in-memory files, an empty
    environment, a fresh working directory removed afterwards;
  - private namespaces, entered by the server before its first fork, so that they cost no call
    anything (_enter_namespaces): as root directly; as an ordinary user (a student's laptop) inside
    a new user namespace mapped to the user's own uid, whose rights the server uses to set up the
    others and then gives up (every capability, and no new privileges), so that a program cannot
    undo them. In them: no network (a network namespace with only its loopback, down); process ids
    of their own (the server is pid 1 there: a program sees and can signal no other process, and
    nothing it starts outlives the server); a file system that is read-only everywhere, with the
    home folder, /root and /run/user/<uid> hidden under empty read-only tmpfs, /var/tmp and /dev/shm
    empty and read-only, and /tmp a fresh tmpfs that holds only the working directories, emptied
    after every call. Where the kernel refuses (user namespaces switched off, a container without
    the rights) the server runs without them and says so: the host announces the layers in place
    once, at start-up (_announce; Executor.layers);
  - the return value is turned into a literal repr inside the child (exact builtin types only,
    with caps on depth, element count and size); the host only ever sees that string and parses
    it with executor.parse_literal, never with eval.

The file has four parts: what executor.py shares with the jail (the job format, the import rule,
the cap on messages), then from the inside out the child (runs in a forked process of a server),
the server (a warm interpreter with one hash seed that forks one child per call), and the host
side (Server: starts one server and speaks to it over pipes; the Executor holds two per worker).
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
    from types import CodeType

# This file is the warm server's program, and every module the server imports makes each of its
# forks slower: `threading` alone (imported by subprocess, queue and concurrent.futures) runs an
# after-fork hook that cost 0.35 ms of a 0.9 ms fork here. So the top of this file imports only what
# the server uses, and the host-only modules are imported where the host uses them (Server.start).

# --------------------------------------------------------------------------------------------------
# Shared with executor.py: the job format, the import rule, the cap on messages
# --------------------------------------------------------------------------------------------------

def make_job(code: CodeType, call_code: CodeType) -> bytes:
    """A job for a server: the program and the call f(input), both compiled by the host, marshalled
    together. The child unmarshals it and runs it (_child_main); it parses and compiles nothing."""
    return marshal.dumps((code, call_code))


def module_allowed(name: str, refused) -> bool:
    """The import guard's rule, which executor.py's static check applies to the program's text too:
    a module is refused when its top-level package is in `refused` or a part of its name is private
    (_thread, _posixsubprocess, __main__, ...)."""
    parts = name.split(".")
    return parts[0] not in refused and not any(p.startswith("_") for p in parts)


def shorten(text: str, limit: int) -> str:
    """text, cut to at most limit characters: every error message, the host's and the jail's, is capped."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# The child: runs inside a forked process of a server (never in the host)
# --------------------------------------------------------------------------------------------------

_EXACT_LITERAL_TYPES = (type(None), bool, int, float, complex, str, bytes)
_EXACT_CONTAINER_TYPES = (list, tuple, set, frozenset, dict)


def _to_literal(value, caps: dict) -> tuple[str, str]:
    """(status, text): the repr of a value made of exact builtin types, or why it is not one.
    Exact types only: a subclass of int or str could lie in __repr__ or __eq__. caps: the
    configuration's (see serve)."""
    max_items, max_depth, max_chars = caps["value_items"], caps["value_depth"], caps["value_chars"]
    stack, items = [(value, 0)], 0
    while stack:
        obj, depth = stack.pop()
        items += 1
        if items > max_items:
            return "unserializable", f"return value has more than {max_items} items"
        if depth > max_depth:
            return "unserializable", f"return value is nested deeper than {max_depth}"
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
        return "unserializable", shorten(f"repr failed: {exc}", caps["error_chars"])
    if len(text) > max_chars:
        return "unserializable", f"return value repr is longer than {max_chars} characters"
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
        code, call_code = marshal.loads(_read_all(job_fd))   # from the host (make_job)
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
    caps = config["caps"]
    namespace = {"__name__": "__azr_task__", "__builtins__": builtins}
    try:
        exec(code, namespace)
        if not callable(namespace.get("f")):
            status, text = "error", "NameError: the program defines no function f"
        else:
            value = eval(call_code, namespace)
            status, text = _to_literal(value, caps)
    except MemoryError:
        status, text = "memory", "MemoryError"
    except BaseException as exc:                       # SystemExit and KeyboardInterrupt too
        status, text = "error", _describe(exc, caps["error_chars"])
    _child_write(result_fd, status, text, write, encode)   # prints are already written (python -u)
    exit_now(0)


def _read_all(fd: int) -> bytes:
    chunks = []
    while data := os.read(fd, 65536):
        chunks.append(data)
    return b"".join(chunks)


def _describe(exc: BaseException, limit: int) -> str:
    """'TypeError: message', at most limit characters, without trusting the exception's own __str__
    to behave."""
    name = type(exc).__name__ if isinstance(type(exc).__name__, str) else "Exception"
    try:
        message = str(exc)
    except BaseException:
        message = "<unprintable message>"
    return shorten(f"{name}: {message}" if message else name, limit)


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
# child closes everything below it that it does not need), and the folder for the working
# directories, numbered by _run_count: the fresh /tmp in the namespaces, else a folder of its own
# under TMPDIR. Both are 0711: as root, "nobody" can enter its own subfolder but not list or create
# anything; as a user, the child has the server's uid and can, so it is emptied after every call.
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


# Linux's flags for unshare(2), mount(2) and prctl(2). The three kept by a remount (nosuid, nodev,
# noexec) have the same values in statvfs's f_flag (os.ST_NOSUID, ...).
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
_PR_SET_NO_NEW_PRIVS = 38
# Replaced by fresh empty tmpfs: /tmp writable (it holds the working directories), the others read-only
_SCRATCH_FOLDERS = ("/tmp", "/var/tmp", "/dev/shm")


def _enter_namespaces(hidden: list[str]) -> tuple[list[str], str | None]:
    """Before the first fork: move this server, and so every child it will fork, into private
    namespaces (the module docstring says what they hold). hidden: the folders to hide (the host's
    _private_folders). Returns the layers now in place and None, or no layers and why the kernel
    refused them. After a success this process is pid 1 of its own pid namespace (_become_pid_one).

    As an ordinary user the new user namespace gives the server every capability inside it, which is
    what setting up the others takes; it gives them all up at the end, since with them a program could
    unmount the hidden folders or bring the network up. As root the children drop to "nobody" instead."""
    libc = _libc()
    if libc is None or not hasattr(libc, "unshare"):
        return [], "no Linux C library"
    as_root = os.getuid() == 0
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | (0 if as_root else _CLONE_NEWUSER)
    if libc.unshare(flags) != 0:
        wanted = "private namespaces" if as_root else "a user namespace"
        return [], f"the kernel refused {wanted}: {_last_error()}"
    layers = [] if as_root else ["user namespace without capabilities"]
    if not as_root:
        # The new namespace maps no uid at all until told: map the user's own uid and gid to
        # themselves (an unprivileged process may map only those, and must refuse setgroups first).
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    _become_pid_one()
    layers += ["no network", "own process ids"] + _private_mounts(libc, hidden)
    if not as_root:
        _drop_capabilities(libc)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)           # no exec of a setuid program regains any right
    return layers, None


def _become_pid_one() -> None:
    """unshare(CLONE_NEWPID) moves only the caller's future children into the new pid namespace: fork
    once and let the child, pid 1 there, go on as the server. This process, the one the host started
    and knows, stays behind, waits and ends with it. Should it be killed first, the server dies with
    it (_die_with_parent), and with pid 1 the kernel kills everything in its namespace; but pid 1 is
    then left for the machine's init to reap. So when the host goes (or the host thread that started
    it: that is when the kernel sends the signal), it asks for SIGTERM instead, kills pid 1 and reaps it."""
    pid = os.fork()
    if pid == 0:
        _die_with_parent()                             # not inherited across fork
        return

    def end_pid_one(signum, frame):
        os.kill(pid, signal.SIGKILL)                   # the waitpid below then returns

    signal.signal(signal.SIGTERM, end_pid_one)
    _prctl(1, signal.SIGTERM, 0, 0, 0)                 # PR_SET_PDEATHSIG, as in _die_with_parent
    _, status = os.waitpid(pid, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _private_mounts(libc, hidden: list[str]) -> list[str]:
    """In the server's new mount namespace: a fresh /proc (pid 1's view), everything else read-only,
    the hidden folders under empty read-only tmpfs, and fresh scratch folders. Returns the layers in
    place; a step the kernel refuses is left out of them, never silently assumed."""
    if not _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE):   # nothing may reach the real mounts
        raise OSError(f"cannot make the mounts private: {_last_error()}")
    layers = []
    covered = [*hidden, *_SCRATCH_FOLDERS]
    # Read-only first, while every mount point can still be reached; those under a folder about to
    # be hidden or replaced need not be.
    failed = []
    for point in _mount_points():
        if not any(_inside(point, folder) for folder in covered) and not _remount_read_only(libc, point):
            failed.append(point)
    layers.append("read-only file system" + (f" except {', '.join(failed)}" if failed else ""))
    if _mount(libc, "proc", "/proc", "proc", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC):
        layers.append("own /proc")
    elif _mount_empty(libc, "/proc"):                  # a container may refuse a new /proc: hide the old one
        layers.append("no /proc")
    # The working directories go on a fresh writable /tmp (see _server_setup); without it they
    # would have nowhere to go on a read-only file system.
    if not _mount(libc, "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=256m,mode=711"):
        raise OSError(f"cannot mount a tmpfs on /tmp: {_last_error()}")
    done = []
    for folder in hidden:                              # one inside another is gone once that one is hidden
        if os.path.isdir(folder) and _mount_empty(libc, folder):
            done.append(folder)
    if done:
        layers.append("hidden: " + ", ".join(done))
    emptied = ["/tmp"]
    for folder in _SCRATCH_FOLDERS[1:]:
        if os.path.isdir(folder) and _mount_empty(libc, folder):
            emptied.append(folder)
    layers.append("empty " + ", ".join(emptied))
    return layers


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
    return libc.mount(_c_text(source), _c_text(target), _c_text(fstype), flags, _c_text(data)) == 0


def _c_text(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _mount_empty(libc, folder: str) -> bool:
    """Hide a folder under an empty read-only tmpfs."""
    return _mount(libc, "tmpfs", folder, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=755")


def _remount_read_only(libc, point: str) -> bool:
    """Remount one mount read-only. In a user namespace the kernel locks nosuid, nodev and noexec on
    the mounts it copied, so a remount must repeat them or be refused."""
    try:
        kept = os.statvfs(point).f_flag & (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC)
    except OSError:
        return False
    return _mount(libc, None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | kept)


def _mount_points() -> list[str]:
    """Every mount point of this mount namespace, parents first, each once (a path mounted over twice
    is remounted once). From /proc/self/mountinfo, whose fifth field is the mount point with space,
    tab, newline and backslash written as octal escapes (\\040)."""
    import re
    points = []
    with open("/proc/self/mountinfo") as lines:
        for line in lines:
            point = re.sub(r"\\([0-7]{3})", _octal_escape, line.split()[4])
            if point not in points:
                points.append(point)
    return points


def _octal_escape(match) -> str:
    return chr(int(match.group(1), 8))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _drop_capabilities(libc) -> None:
    """capset(2) with every set empty: the server, and each child it forks, keeps no capability in its
    user namespace. Raises OSError if the kernel refuses (a program could then undo the mounts)."""
    import ctypes
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)      # _LINUX_CAPABILITY_VERSION_3, this process
    sets = (ctypes.c_uint32 * 6)()                     # effective, permitted, inheritable; 2 x 32 bits; all 0
    if libc.capset(header, sets) != 0:
        raise OSError(f"cannot drop the capabilities: {_last_error()}")


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _last_error() -> str:
    import ctypes
    return os.strerror(ctypes.get_errno())


def _server_setup(config: dict) -> tuple[list[str], str | None]:
    """Once per server, before the first fork: every module a child may use, the namespaces, folders.
    Returns the jail's layers and, where the kernel refused the namespaces, why (see _enter_namespaces)."""
    import importlib
    global _prctl, _devnull, _max_fd, _run_root
    _prctl = getattr(_libc(), "prctl", None)             # None: not Linux
    _die_with_parent()
    import encodings
    import pkgutil
    # Every text codec too: Python loads them on first use (CRUXEval has "abc".encode("shift_jis")).
    # Not the two that need compression libraries: str.encode cannot use them, and each library
    # mapped into the server makes every fork slower. All of it before the namespaces, which may
    # hide the interpreter's own files (a virtual environment or pyenv in the home folder).
    codecs = [m.name for m in pkgutil.iter_modules(encodings.__path__) if m.name not in ("bz2_codec", "zlib_codec")]
    for module in config["allowed_modules"] + [f"encodings.{name}" for name in codecs]:
        try:
            importlib.import_module(module)
        except Exception:
            pass
    _devnull = os.open(os.devnull, os.O_RDONLY)
    _max_fd = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    layers = ["static check", "import guard"] if config["check_safety"] else []
    layers += ["resource limits", "no new processes"] + (["uid nobody"] if os.getuid() == 0 else [])
    namespaces, refused = _enter_namespaces(config["hidden"])
    if refused is None:
        _run_root = "/tmp"                              # the fresh tmpfs, the only writable folder
    else:
        _run_root = f"{os.environ.get('TMPDIR', '/tmp')}/azr-run-{os.getpid()}-{os.urandom(4).hex()}"
        os.mkdir(_run_root)
        os.chmod(_run_root, 0o711)
    os.environ.clear()                                  # children inherit an empty environment
    return layers + namespaces, refused


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


def _install_import_guard(refused: list[str]) -> None:
    """From here on no module is read from disk, and a refused module (module_allowed) is refused
    even when it is loaded. Installed in the server once its own imports are done; every child
    inherits it."""
    real_import = builtins.__import__
    refused = frozenset(refused)

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if not module_allowed(name, refused) or level:
            raise ImportError(f"import of '{name}' is not allowed")
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded_import
    sys.meta_path[:] = []
    sys.path[:] = []


def serve(config_json: str) -> None:
    """The server's program (Server.start runs it). A job is its length on a line, then that many
    bytes (make_job), passed to the child as they came. Each reply is one JSON line. The first line
    is a greeting: the jail's layers, or why the server could not set it up.

    config, the same for every job: from the Executor, its limits (timeout_s, memory_mb,
    max_output_chars), check_safety, and of executor.py's rules the allowed_modules (imported before
    any fork), the refused_modules (module_allowed), the statuses a child may report (any other
    reply is a crash) and the caps (value_items, value_depth, value_chars for a return value,
    error_chars for a message); from Server.start, the folders to hide."""
    config = json.loads(config_json)
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)        # a stray print never corrupts the protocol
    try:
        layers, refused = _server_setup(config)
    except Exception as exc:                            # never run a program in a half-built jail
        error = _describe(exc, config["caps"]["error_chars"])
        replies.write(json.dumps({"ready": False, "error": error}).encode() + b"\n")
        return
    config = dict(config, rlimits=_child_rlimits(config["limits"]))
    warm_up = make_job(compile("def f(a):\n    return a", "<program>", "exec", dont_inherit=True),
                       compile("f('warm'\n)", "<input>", "eval", dont_inherit=True))
    _Child(config).run(warm_up)                         # the first fork is slow
    _release_free_memory()
    import gc
    gc.freeze()                                         # fewer copy-on-write page faults per fork
    if config["check_safety"]:
        _install_import_guard(config["refused_modules"])
    hello = {"ready": True, "layers": layers, "refused": refused, "run_root": _run_root}
    replies.write(json.dumps(hello).encode() + b"\n")
    child = _Child(config)
    for header in requests:
        reply = child.run(requests.read(int(header)))
        replies.write(json.dumps(reply).encode() + b"\n")
        child = _Child(config)                          # forked while the host reads the reply
    child.discard()                                     # stdin closed: the host is done (Server.stop)
    os._exit(0)


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


def _empty_run_root() -> None:
    """Remove what a program left in the run root beside its working directory. Only a child with the
    server's uid can write there (an ordinary user's), and there it is the one writable folder of
    the namespaces, so nothing a program writes outlives its call. Empty, the common case, this
    costs one directory read."""
    for name in os.listdir(_run_root):
        path = f"{_run_root}/{name}"
        if os.path.isdir(path) and not os.path.islink(path):
            _remove_tree(path)
        else:
            try:
                os.unlink(path)
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

    def discard(self) -> None:
        """Kill the child before it gets a job (the server is ending), reap it and clean up: left to
        die on its own, it would be left for the machine's init to reap."""
        _kill_group(self.pid)
        os.waitpid(self.pid, 0)
        for fd in (self.job_write, self.read_fd, self.out_fd, self.err_fd):
            os.close(fd)
        _remove_tree(self.workdir)

    def run(self, job: bytes) -> dict:
        """Hand the job (make_job) over, wait for the child until the deadline, clean up, classify
        the outcome."""
        start = time.monotonic()
        try:
            os.write(self.job_write, job)
        except BrokenPipeError:                         # the child died while waiting: crash below
            pass
        os.close(self.job_write)
        pid, read_fd, out_fd, err_fd = self.pid, self.read_fd, self.out_fd, self.err_fd
        limits, max_value_chars = self.config["limits"], self.config["caps"]["value_chars"]
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
                    elif size <= max_value_chars * 8:
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
        _empty_run_root()

        cap = limits["max_output_chars"]
        if timed_out:
            return _reply("timeout", None, f"no result within {limits['timeout_s']:g} s", seconds)
        if out_size > cap or err_size > cap:
            return _reply("output_limit", None, f"printed more than {cap} characters", seconds)
        status, _, text = b"".join(chunks).decode("utf-8", "replace").partition("\n")
        if status == "ok":
            return _reply("ok", text, None, seconds)
        if status in self.config["statuses"]:
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
        message = f"{reason} {last_line[0]}".strip()
        return _reply("crash", None, shorten(message, self.config["caps"]["error_chars"]), seconds)


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

SERVER_GRACE_S = 30.0   # a server that has not answered timeout_s + this after a job hangs
SERVER_EXIT_S = 1.0     # a server told to stop (its stdin closed) that has not ended by then is killed


class Server:
    """One warm interpreter started with one PYTHONHASHSEED, spoken to over pipes. config: as serve
    describes it (the Executor's), less the folders to hide, which start() adds."""

    def __init__(self, hash_seed: int, config: dict) -> None:
        self.hash_seed, self.config = hash_seed, config
        self.proc: subprocess.Popen | None = None
        self.isolated = False                            # in private namespaces (_enter_namespaces)
        self.layers: tuple[str, ...] | None = None       # as the server reported them when it started
        self.run_root: str | None = None

    def start(self) -> None:
        import subprocess
        import tempfile
        env = {"PYTHONHASHSEED": str(self.hash_seed), "PATH": os.defpath, "LC_ALL": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": tempfile.gettempdir()}
        # The server imports this module by name, so it uses the cached bytecode when there is some
        # (compiling the source leaves freed parser memory behind; see _release_free_memory).
        folder, module = os.path.split(os.path.splitext(os.path.abspath(__file__))[0])
        bootstrap = f"import sys; sys.path.insert(0, {folder!r}); import {module}; {module}.serve(sys.argv[1])"
        config = dict(self.config, hidden=_private_folders())
        self.proc = subprocess.Popen(
            # -S: no site-packages and no .pth start-up hooks (one here imports threading);
            # -u: unbuffered stdout and stderr, so a child has nothing to flush before it exits
            [sys.executable, "-S", "-u", "-c", bootstrap, json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, cwd="/", start_new_session=True)
        hello = self._read_line(timeout_s=60)
        if hello is None:
            self.stop()
            raise RuntimeError("the executor's server process did not start")
        hello = json.loads(hello)
        if not hello["ready"]:
            self.stop()
            raise RuntimeError(f"the executor's server could not set up its jail: {hello['error']}")
        self.layers = tuple(hello["layers"])
        self.isolated = hello["refused"] is None
        # Outside private namespaces the server's folder is on the real file system: removed in stop()
        self.run_root = None if self.isolated else hello["run_root"]
        _announce(_describe_jail(self.layers, hello["refused"]))

    def call(self, job: bytes) -> dict:
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

    def receive(self) -> dict:
        """The job's result: status, value, error and seconds (what executor.py makes a RunResult).
        A server that died or hangs is stopped and the job counts as a crash."""
        line = None
        if self.proc is not None:
            try:
                line = self._read_line(timeout_s=self.config["limits"]["timeout_s"] + SERVER_GRACE_S)
            except OSError:
                pass
        if line is None:
            self.stop(at_once=True)
            return _reply("crash", None, "the executor's server process died; restarted", 0.0)
        return json.loads(line)                         # what the server's _Child.run returned

    def _read_line(self, timeout_s: float) -> bytes | None:
        stream = self.proc.stdout
        poller = select.poll()
        poller.register(stream, select.POLLIN)
        if not poller.poll(timeout_s * 1000):
            return None
        line = stream.readline()
        return line or None

    def stop(self, at_once: bool = False) -> None:
        """End the server. One that waits for a job ends itself once its stdin closes, in order: in a
        pid namespace its pid 1 goes first and is reaped by the process the host started (killed
        together, pid 1 would be left to the machine's init to reap). One that does not end within
        SERVER_EXIT_S (running a job), or that hangs or has died (at_once), is killed with its
        process group."""
        import subprocess
        if self.proc is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=0 if at_once else SERVER_EXIT_S)
            except subprocess.TimeoutExpired:
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


def _private_folders() -> list[str]:
    """The folders of the user who starts the executor that no program may see: the home folder (as
    $HOME and as the user database give it), /root, and the runtime folder, which holds the user's
    sockets (ssh-agent, D-Bus). Never "/" (a service account's home). Sorted: a parent comes before
    the folders inside it."""
    import pwd
    folders = [os.path.expanduser("~"), "/root", f"/run/user/{os.getuid()}", os.environ.get("XDG_RUNTIME_DIR", "")]
    try:
        folders.append(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:                                    # a uid with no entry (the tests use one)
        pass
    folders = {os.path.normpath(folder) for folder in folders if os.path.isabs(folder)}
    return sorted(folders - {"/"})


def _describe_jail(layers: tuple[str, ...], refused: str | None) -> str:
    """The start-up line: the jail's layers and, where the kernel refused the namespaces, what a
    program can then reach."""
    line = "[executor] jail: " + "; ".join(layers)
    if refused is None:
        return line
    if os.getuid() == 0:
        reach = "the network and the world-writable folders (as uid nobody)"
    else:
        reach = "this user's files and processes and the network"
    guard = "gets past the static check" if "static check" in layers else "runs (the static check is off)"
    return f"{line}. NOT ISOLATED ({refused}): a program that {guard} can reach {reach}"


_announced: set[str] = set()   # the start-up lines this process has printed


def _announce(line: str) -> None:
    """Print a start-up line to stderr, once per process: the trainer starts many servers, and the
    tests many executors."""
    if line not in _announced:
        _announced.add(line)
        print(line, file=sys.stderr, flush=True)

"""The executor as a student runs it: started by an ordinary user. tests/test_executor.py runs this
file with an unprivileged uid (CI runs as root, so the test drops to a throwaway uid itself), and
imports its process checks, which both use.

    python jail_as_a_user.py CODE_FOLDER < request.json > report.json

CODE_FOLDER holds executor.py and sandbox.py. The request names the jobs: each runs on an executor
with the static check on or off, and after each the worker checks that the executor is still
healthy and that no process was left behind; then the CRUXEval rows are validated. With "refuse",
the worker first nests user namespaces until the kernel refuses one more, so that the executor
meets a real refusal (as on a kernel with user namespaces switched off) and falls back.
Only the standard library: the interpreter may be the system's, when the trainer's is out of reach
of the throwaway uid (under /root, say).
"""
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

CLEAN = ("def f(xs, k):\n    return sorted(xs)[:k]", "[3, 1, 2], 2", "[1, 2]")
_CLONE_NEWUSER = 0x10000000


class Process(NamedTuple):
    ppid: int
    uid: int        # the real uid
    cmd: str
    pid_one: bool   # pid 1 of a pid namespace of its own (seen from outside it)


def processes() -> dict[int, Process]:
    """Every live process, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
            with open(f"/proc/{entry}/status") as file:
                status = file.read()
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                cmd = file.read().replace(b"\0", b" ").decode()
            uid = int(status.split("\nUid:")[1].split()[0])
            ns_pids = status.split("\nNSpid:")[1].split("\n")[0].split()
        except (OSError, IndexError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        found[int(entry)] = Process(ppid, uid, cmd, len(ns_pids) > 1 and ns_pids[-1] == "1")
    return found


def stray_processes(program_uid: int | None) -> list[tuple[int, Process]]:
    """Leftovers of the programs run by this process's executors. What may live after a call: the
    servers (children of this process; in private namespaces each has one child of its own, pid 1 of
    a pid namespace, that does the forking: see sandbox.py) and, per forking server, at most
    one idle child forked for the next call. Anything deeper is a leftover, and so is any other
    process of program_uid, the uid programs run as, where that uid runs nothing else ("nobody" as
    root, a throwaway uid here; None: not checked)."""
    procs = processes()
    me = os.getpid()
    started = {pid for pid, p in procs.items() if p.ppid == me and ".serve(" in p.cmd}
    pid_ones = {pid for pid, p in procs.items() if p.ppid in started and p.pid_one}
    forking = pid_ones | (started - {procs[pid].ppid for pid in pid_ones})
    children: dict[int, list[int]] = {}
    for pid, p in procs.items():
        if p.ppid in forking:
            children.setdefault(p.ppid, []).append(pid)
    idle = {pids[0] for pids in children.values() if len(pids) == 1}
    known = {me} | started | pid_ones | idle
    stray = []
    for pid, p in procs.items():
        second_child = p.ppid in forking and pid not in idle
        deeper = p.ppid in procs and procs[p.ppid].ppid in forking
        if second_child or deeper or (p.uid == program_uid and pid not in known):
            stray.append((pid, p))
    return stray


def wait_for_no_strays(program_uid: int | None, wait_s: float = 2.0) -> list[tuple[int, Process]]:
    """stray_processes, given a killed child a moment to be reaped."""
    deadline = time.monotonic() + wait_s
    while (stray := stray_processes(program_uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return stray


def user_namespaces_allowed() -> bool:
    """Whether the kernel lets this process create the namespaces sandbox.py asks for (tried in a
    forked child, which exits at once)."""
    import ctypes
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        flags = _CLONE_NEWUSER | 0x00020000 | 0x20000000 | 0x40000000   # user, mount, pid, network
        os._exit(0 if libc.unshare(flags) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def exhaust_user_namespaces() -> str:
    """Nest user namespaces, each mapped to this uid, until the kernel refuses one more (it allows 32
    levels). Returns the kernel's reason. Only before any thread starts: unshare needs a lone thread."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    while libc.unshare(_CLONE_NEWUSER) == 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as file:
                file.write(text)
    return os.strerror(ctypes.get_errno())


def run_jobs(executor, jobs: list[dict]) -> list[dict]:
    """Each job, then a clean program, then a look for leftovers."""
    from executor import same_value
    results = []
    for job in jobs:
        result = executor.run(job["program"], job["input"].replace("MY_PID", str(os.getpid())))
        clean = executor.run(*CLEAN[:2])
        results.append({"status": result.status, "value": result.value, "error": result.error,
                        "healthy": clean.status == "ok" and same_value(clean.value, CLEAN[2]),
                        "stray": [pid for pid, _ in wait_for_no_strays(os.getuid())]})
    return results


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    from executor import Executor, same_value
    request = json.load(sys.stdin)
    report = {"uid": os.getuid(), "user_namespaces": user_namespaces_allowed(), "results": {}}
    if request.get("refuse"):
        report["refused"] = exhaust_user_namespaces()
    limits = {"timeout_s": 1.0, "memory_mb": 256, "max_output_chars": 2000, "workers": 1}
    with Executor(**limits) as safe, Executor(check_safety=False, **limits) as raw:
        report.update(layers=raw.layers, safe_layers=safe.layers, isolated=raw.isolated and safe.isolated)
        # A job that needs the namespaces (a real file deletion, say) never runs without them.
        jobs = [job for job in request["jobs"] if raw.isolated or not job.get("isolated_only")]
        # The two executors side by side: most of the time goes to programs that run until the deadline
        safe_jobs = [job for job in jobs if job["check_safety"]]
        raw_jobs = [job for job in jobs if not job["check_safety"]]
        with ThreadPoolExecutor(2) as pool:
            safe_results = pool.submit(run_jobs, safe, safe_jobs)
            raw_results = pool.submit(run_jobs, raw, raw_jobs)
            for group, results in ((safe_jobs, safe_results.result()), (raw_jobs, raw_results.result())):
                for job, result in zip(group, results):
                    report["results"][job["name"]] = result
    if request.get("cruxeval"):
        rows = request["cruxeval"]
        with Executor(workers=2) as executor:
            results = executor.validate_many([(row["code"], row["input"]) for row in rows])
        report["cruxeval_wrong"] = [row["id"] for row, result in zip(rows, results)
                                    if result.status != "ok" or not same_value(result.value, row["output"])]
    # After close: nothing of this uid but this process
    time.sleep(0.2)
    report["left_after_close"] = [pid for pid, p in processes().items() if p.uid == os.getuid() and pid != os.getpid()]
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()

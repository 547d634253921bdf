"""Runs the app's entry point many times without paying its imports each time: a server
process imports torch, Lightning, Hydra and ``lightning_imex.train`` once (about 5 s),
then forks a child per run that calls ``lightning_imex.train.main()`` as the console
script does (or runs a script as ``python SCRIPT`` would: the README's examples), with its
own ``sys.argv``, working directory, stdout and stderr. Each run is
still a process of its own: it can SIGKILL itself (``crash_callbacks``) and the server
reports how it ended as ``subprocess`` does (``returncode`` -9).

The server stays single-threaded (its imports start no thread with OpenMP and BLAS held
to one; it checks): a child forked from a process with other threads could inherit locks
held by threads it does not have. One thread each also suits two runs at a time on two
cores, which torch's default of a thread per core slows down many times over.

    with AppRunners(2) as app:  # two servers: two runs at a time
        result = app.run(folder.parent, ["optimizer=adam", f"hydra.run.dir={folder}"])
        assert result.returncode == 0, result.stderr[-3000:]

Run as a script, this file is the server: it reads one JSON request a line on stdin and
answers each, when its child has ended, with one JSON line on stdout."""

from __future__ import annotations

import json
import os
import queue
import runpy
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
TIMEOUT = 120  # seconds a run may take (one takes 1-3 s on an idle core)
STARTUP = 120  # seconds the server's imports may take


class AppServer:
    """One server process: one run at a time."""

    def __init__(self, scratch: Path) -> None:
        """Starts the server; :meth:`wait_ready` waits for its imports."""
        self.scratch, self.requests = scratch, 0
        self.stderr_path = scratch / f"server-{id(self)}.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=stderr, env={**os.environ, **THREADS})

    def wait_ready(self) -> None:
        self._answer(STARTUP)

    def run(self, cwd: Path, args: list[str], timeout: float = TIMEOUT, env: dict[str, str] | None = None,
            script: Path | None = None) -> subprocess.CompletedProcess:
        """Runs ``lightning-imex-train *args`` (or with ``script``, ``python script *args``)
        in ``cwd`` (with the environment ``env``, else the server's); raises
        ``TimeoutError`` (with the run's stderr) if it takes longer than ``timeout``
        seconds (the server kills it)."""
        self.requests += 1
        out, err = (self.scratch / f"run-{id(self)}-{self.requests}.{name}" for name in ("stdout", "stderr"))
        out.touch(), err.touch()  # there to read even if the child dies before it opens them
        argv = [str(script) if script else "lightning-imex-train", *args]
        request = {"cwd": str(cwd), "argv": argv, "script": script is not None, "stdout": str(out), "stderr": str(err),
                   "timeout": timeout, "env": None if env is None else {**env, **THREADS}}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        answer = self._answer(timeout + 30)
        stdout, stderr = (path.read_text(errors="replace") for path in (out, err))
        out.unlink(), err.unlink()
        if answer["returncode"] is None:
            raise TimeoutError(f"{' '.join(argv)} ran over {timeout} s; its stderr ends:\n{stderr[-3000:]}")
        return subprocess.CompletedProcess(request["argv"], answer["returncode"], stdout, stderr)

    def _answer(self, timeout: float) -> dict:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else b""
        if not line:
            self.close()
            raise RuntimeError(f"the fork server {'ended' if readable else f'did not answer in {timeout} s'}; "
                               f"its stderr ends:\n{self.stderr_path.read_text(errors='replace')[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        """Kills the server: it holds nothing to save, and its interpreter's shutdown takes seconds."""
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


class AppRunners:
    """``count`` servers, importing at the same time; ``run`` takes a free one, so that
    ``count`` threads can run the app at a time."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __enter__(self) -> AppRunners:
        self.scratch = Path(tempfile.mkdtemp(prefix="fork-runner-"))
        self.servers: list[AppServer] = []
        self.free: queue.Queue[AppServer] = queue.Queue()
        try:
            for _ in range(self.count):
                self.servers.append(AppServer(self.scratch))
            for server in self.servers:
                server.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        for server in self.servers:
            self.free.put(server)
        return self

    def run(self, cwd: Path, args: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        server = self.free.get()
        try:
            return server.run(cwd, args, timeout)
        finally:
            self.free.put(server)

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# the server


def serve() -> None:
    import crash_callbacks  # noqa: F401  (tests/ is this script's folder, on sys.path)
    import lightning_imex.train  # noqa: F401  (with torch, Lightning and Hydra)
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads != 1:
        raise RuntimeError(f"the fork server has {threads} threads after its imports; it must fork with one")
    answer({"ready": True})
    for line in sys.stdin.buffer:  # until the client closes it, or kills this process
        request = json.loads(line)
        answer({"returncode": fork_and_wait(request)})


def answer(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()  # nothing buffered for a child to inherit


def fork_and_wait(request: dict) -> int | None:
    """The child's exit code (-N for signal N), None when it ran over its time and was killed."""
    pid = os.fork()
    if pid == 0:
        run_app(request)
    deadline = time.monotonic() + request["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def run_app(request: dict) -> None:
    """In the child: the console script ``lightning-imex-train`` (or the script
    ``argv[0]`` as ``__main__``), then ``os._exit`` (the server's stack and exit handlers
    are not the child's to run)."""
    code = 1
    try:
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        os.chdir(request["cwd"])
        if request.get("env") is not None:
            os.environ.clear()
            os.environ.update(request["env"])
        sys.argv = request["argv"]
        from lightning_imex.train import main
        try:
            if request.get("script"):
                sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as python SCRIPT sets it
                runpy.run_path(sys.argv[0], run_name="__main__")
            else:
                main()
            code = 0
        except SystemExit as stop:  # as the interpreter reports it
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


def forked(target, *args) -> list[int]:
    """Runs ``target(*a)`` for each argument tuple ``a`` in a forked process at once (the
    ranks of a gloo test), and their exit codes once all have ended."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=target, args=a) for a in args]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    return [process.exitcode for process in processes]


if __name__ == "__main__":
    serve()


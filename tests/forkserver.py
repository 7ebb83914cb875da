"""``python -m dtp_search`` in a process of its own, started by forking a server that has
already imported what the command imports.

Each new interpreter spends about 5 CPU-seconds before the command does anything: 4 to
import torch, MLflow, Optuna, Hydra and matplotlib, 1.4 more for ``torch._dynamo``, which
the first optimizer imports. The tests that need a real process (signals, SIGKILL,
several workers on one study, exit statuses, a second run resuming the first) start
about twenty, so on a 2-core machine a fork server saves about a minute of ``make test``.

What a test gets is still a process of its own, with its own pid, session, working
folder, environment, file descriptors and signal handlers, that runs
``dtp_search/__main__.py`` as ``__main__`` exactly as ``python -m dtp_search`` does, atexit
handlers included. What differs from a new interpreter:

* the modules are imported once, in the server, with the server's environment (the test
  worker's: ``OMP_NUM_THREADS``, ``MLFLOW_DISABLE_TELEMETRY``); a variable that a library
  reads only at import therefore has the server's value. ``OMP_NUM_THREADS`` given to the
  child sets torch's thread count, as it would at import;
* numpy's global random state is reseeded in each child (Python's ``random`` reseeds
  itself after a fork; torch's default generator starts from its fixed default seed in
  both cases), but the hash seed (``PYTHONHASHSEED``) is the server's in every child;
* ``PYTHONWARNINGS`` is applied in the child; the other variables Python reads only at
  start-up (``PYTHONUNBUFFERED``, ``PYTHONHASHSEED``, ...) have the server's values, and a
  warning a module gave while it was imported was given in the server.

This is the design of :mod:`multiprocessing`'s ``forkserver`` start method (a clean
process forks on request; the file descriptors travel over a Unix socket), which cannot
run a ``-m`` module with a command line of its own, hence this module. Tests of what only
a new interpreter shows (a bad command line's exit status from a real ``python``, a
download that reads proxy settings, the imports of the pruning core) start
``sys.executable`` themselves.

The server is started on first use, one per test process (pytest-xdist worker), and ends
when that process does (it reads its stdin, a pipe from the test process, to its end).
An intermediate process per child waits for it and reports its exit status, so that the
server never has threads or unreaped children of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import pickle
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings

_INT = struct.Struct("!i")
_LEN = struct.Struct("!Q")

# What the server imports before it forks: every module a study run imports that takes
# long to import (a run imports the rest itself). ``dtp_search.__main__`` is not among
# them: the child runs it as ``__main__``, as ``python -m dtp_search`` does.
_PRELOAD = (
    "torch",
    "torch._dynamo",  # imported by the first torch.optim optimizer: 1.4 s
    "torchvision",
    "numpy",
    "pandas",
    "sklearn.model_selection",
    "sklearn.datasets",
    "matplotlib.pyplot",
    "hydra",
    "omegaconf",
    "optuna",
    "optuna.visualization.matplotlib",
    "mlflow",
    "mlflow.tracking",
    "sqlalchemy",
    "dtp_search.search.study",
    "dtp_search.search.config",
)


# ---------------------------------------------------------------------------------------
# The client: a Popen-like handle on a forked ``python -m dtp_search``.


class Process:
    """The part of :class:`subprocess.Popen` the tests use, for a process the server
    forked: ``pid``, ``returncode``, ``stdout``/``stderr`` (with ``PIPE``), ``poll``,
    ``wait``, ``communicate``, ``send_signal``, ``kill``."""

    def __init__(self, args: list[str], pid: int, conn: socket.socket, stdout, stderr) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = stdout
        self.stderr = stderr
        self._conn = conn

    def poll(self) -> int | None:
        if self.returncode is None:
            with selectors.DefaultSelector() as sel:
                sel.register(self._conn, selectors.EVENT_READ)
                if sel.select(0):
                    self._read_status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if timeout is not None and timeout <= 0:  # (a socket timeout of 0 never waits)
                if self.poll() is None:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                return self.returncode
            self._conn.settimeout(timeout)
            try:
                self._read_status()
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def _read_status(self) -> None:
        """The 4 bytes the waiter sends when the process has ended (a timeout, if one is
        set, before they arrive raises ``TimeoutError``). Closing the connection tells the
        waiter to reap the process: until then it stays a zombie, as a Popen child does
        until it is waited for, so that a signal sent meanwhile never reaches a reused pid."""
        self.returncode = _INT.unpack(_recv_exact(self._conn, _INT.size))[0]
        self._conn.close()

    def communicate(self, timeout: float | None = None) -> tuple:
        """Read ``stdout``/``stderr`` (where they are pipes) to their end, then wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        outputs = {}
        with selectors.DefaultSelector() as sel:
            for name in ("stdout", "stderr"):
                stream = getattr(self, name)
                if stream is not None:
                    sel.register(stream, selectors.EVENT_READ, name)
                    outputs[name] = []
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        outputs[key.data].append(chunk)
                    else:
                        sel.unregister(key.fileobj)
        results = []
        for name in ("stdout", "stderr"):
            stream = getattr(self, name)
            if stream is None:
                results.append(None)
                continue
            data = b"".join(outputs[name])
            if isinstance(stream, io.TextIOBase):  # universal newlines, as Popen(text=True)
                data = data.decode().replace("\r\n", "\n").replace("\r", "\n")
            results.append(data)
            stream.close()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return tuple(results)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def popen(
    args: list[str],
    *,
    cwd: str | os.PathLike,
    stdout=None,
    stderr=None,
    text: bool = False,
    env: dict[str, str] | None = None,
    start_new_session: bool = False,
) -> Process:
    """``subprocess.Popen([sys.executable, "-m", "dtp_search", *args], ...)``, forked from
    the server: ``stdout``/``stderr`` take ``None`` (this process's), ``subprocess.PIPE``,
    ``subprocess.DEVNULL``, ``subprocess.STDOUT`` (stderr only), a file or a descriptor."""
    if not os.path.isdir(cwd):  # what Popen raises, rather than a child that exits 1
        raise FileNotFoundError(f"No such file or directory: {str(cwd)!r}")
    server = _server()
    to_close: list[int] = []
    ours: dict[str, object] = {}

    def target(spec, name: str, default: int) -> int:
        if spec is None:
            return default
        if spec == subprocess.DEVNULL:
            fd = os.open(os.devnull, os.O_RDWR)
            to_close.append(fd)
            return fd
        if spec == subprocess.PIPE:
            r, w = os.pipe()
            to_close.append(w)
            ours[name] = open(r, encoding="utf-8") if text else open(r, "rb")  # noqa: SIM115
            return w
        return spec if isinstance(spec, int) else spec.fileno()

    out = target(stdout, "stdout", 1)
    err = out if stderr == subprocess.STDOUT else target(stderr, "stderr", 2)
    request = {
        "argv": [str(a) for a in args],
        "cwd": str(cwd),
        "env": dict(os.environ if env is None else env),
        "new_session": start_new_session,
    }
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(server)
        socket.send_fds(conn, [b"x"], [0, out, err])
        payload = pickle.dumps(request)
        conn.sendall(_LEN.pack(len(payload)) + payload)
        pid = _INT.unpack(_recv_exact(conn, _INT.size))[0]
    except BaseException:
        conn.close()
        for f in ours.values():
            f.close()
        raise
    finally:
        for fd in to_close:
            os.close(fd)
    return Process(
        [sys.executable, "-m", "dtp_search", *args],
        pid,
        conn,
        ours.get("stdout"),
        ours.get("stderr"),
    )


def run(
    args: list[str],
    *,
    cwd: str | os.PathLike,
    capture_output: bool = False,
    text: bool = False,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, "-m", "dtp_search", *args], ...)``, forked from
    the server (on a timeout the process is killed, as ``subprocess.run`` does)."""
    pipe = subprocess.PIPE if capture_output else None
    proc = popen(args, cwd=cwd, stdout=pipe, stderr=pipe, text=text, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


_BASE_PATH: list[str] = []  # (in the server: sys.path without its own folder)
_SERVER_WARNOPTIONS: list[str] = []  # (in the server: its own PYTHONWARNINGS)
_lock = threading.Lock()
_address: str | None = None
_server_process: subprocess.Popen | None = None


def _server() -> str:
    """The socket address of this process's server, started on first use (and again
    should it have died)."""
    global _address, _server_process
    with _lock:
        if _server_process is not None and _server_process.poll() is not None:
            _address = None
        if _address is None:
            # In the system's temporary folder, whatever a test has set tempfile.tempdir
            # to (test_scripts sets it to its own folder): a Unix socket's path must stay
            # under about 100 bytes, and the server outlives the test that started it.
            system_tmp = "/tmp" if os.path.isdir("/tmp") else None
            folder = tempfile.mkdtemp(prefix="dtp-forkserver-", dir=system_tmp)
            address = os.path.join(folder, "socket")
            proc = subprocess.Popen(
                [sys.executable, __file__, address],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"),
            )
            ready = proc.stdout.readline()
            if ready != b"ready\n":
                raise RuntimeError(f"the fork server did not start (it said {ready!r})")

            def stop() -> None:
                proc.stdin.close()  # (the server's signal to end; it removes its socket)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                if proc.poll() is None:
                    proc.kill()

            atexit.register(stop)
            _address, _server_process = address, proc
        return _address


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the fork server closed the connection")
        buf += chunk
    return buf


# ---------------------------------------------------------------------------------------
# The server and its children.


def _serve(address: str) -> None:
    import gc
    import importlib

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # (as __main__ sets it)
    for name in _PRELOAD:
        importlib.import_module(name)
    # Objects that exist now are never collected in a child: a collection would write to
    # (and so copy) every page of them.
    gc.freeze()
    # A fork copies only the thread that calls it: a lock another Python thread held
    # would stay held in every child. No preloaded module starts one; should one ever,
    # say so. (Native pools do start at import, torch's, OpenBLAS's, jemalloc's: like
    # DataLoader workers, which are forked the same way, a child gets them again through
    # the libraries' own at-fork handlers.)
    if threading.active_count() != 1:
        raise RuntimeError(f"the fork server runs {threading.enumerate()} after its imports")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(16)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    with selectors.DefaultSelector() as sel:
        sel.register(listener, selectors.EVENT_READ)
        sel.register(sys.stdin, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj is sys.stdin:
                    return  # the test process closed our stdin: it is done
                conn, _ = listener.accept()
                fds: list[int] = []
                try:
                    with conn:
                        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
                        size = _LEN.unpack(_recv_exact(conn, _LEN.size))[0]
                        request = pickle.loads(_recv_exact(conn, size))
                        if os.fork() == 0:
                            listener.close()
                            _wait_for_child(conn, fds, request)  # never returns
                except Exception as exc:  # one client's broken request: the next is served
                    print(f"fork server: request failed: {exc!r}", file=sys.stderr)
                finally:
                    for fd in fds:
                        os.close(fd)


def _wait_for_child(conn: socket.socket, fds: list[int], request: dict) -> None:
    """In the intermediate process: fork the child, tell the client its pid, wait for it,
    tell the client its exit status (as Popen's returncode: -N for signal N)."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _child(fds, request)  # never returns
        for fd in fds:
            os.close(fd)
        conn.sendall(_INT.pack(pid))
        # Ended, but not reaped until the client has the status and closes (or dies): a
        # zombie keeps its pid, so the client's signals never reach a process that reused it.
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        exited = info.si_code == os.CLD_EXITED
        conn.sendall(_INT.pack(info.si_status if exited else -info.si_status))
        with contextlib.suppress(OSError):
            conn.recv(1)
        os.waitpid(pid, 0)
        code = 0
    finally:
        os._exit(code)


def _child(fds: list[int], request: dict) -> None:
    """Become ``python -m dtp_search <argv>``: session, descriptors, folder, environment,
    signal handlers, then ``dtp_search/__main__.py`` as ``__main__``; exit with its
    status, as the interpreter would."""
    import runpy

    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import numpy as np
        import torch

        np.random.seed()  # a new interpreter's numpy draws its own seed
        # -W options from the child's environment (the server's were applied at its start)
        options = [o for o in os.environ.get("PYTHONWARNINGS", "").split(",") if o]
        if options != _SERVER_WARNOPTIONS:
            warnings._processoptions(options)
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        # As ``python -m`` sets it: the working folder, PYTHONPATH, then the rest.
        pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.getcwd(), *pythonpath, *_BASE_PATH]
        sys.argv = ["-m", *request["argv"]]
        try:
            runpy.run_module("dtp_search", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            # As the interpreter does: the traceback, then death by SIGINT itself.
            sys.excepthook(*sys.exc_info())
            _finish()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        _finish()
    finally:
        os._exit(code)


def _finish() -> None:
    """What the interpreter does at exit (Py_FinalizeEx): wait for the threads that are
    not daemons, run the atexit handlers, flush the standard streams."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


if __name__ == "__main__":
    # Run as ``python tests/forkserver.py <address>``: sys.path[0] is this folder, and the
    # rest is what any interpreter here starts with (PYTHONPATH's entries aside, which
    # each child takes from its own environment).
    _pythonpath = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    _BASE_PATH[:] = [p for p in sys.path[1:] if p not in _pythonpath]
    _SERVER_WARNOPTIONS[:] = [o for o in os.environ.get("PYTHONWARNINGS", "").split(",") if o]
    try:
        _serve(sys.argv[1])
    finally:  # (an xdist worker ends without its atexit handlers: the server tidies up)
        with contextlib.suppress(OSError):
            os.unlink(sys.argv[1])
            os.rmdir(os.path.dirname(sys.argv[1]))

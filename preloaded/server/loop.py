"""The warm server: import once, then fork a child per run, in one single-threaded selector loop.

Signal handlers only write to a wakeup pipe; all work happens in the loop. Every child is tied
to its connection: the exit status comes from ``waitpid`` and goes back over that connection,
and a connection that closes early takes its child down with it.

Forking is kept off a run's path: the loop hands each run to a standby child forked ahead
(``preloaded.server.standby``), and learns between runs (``preloaded.server.learn``).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import time

from preloaded import wire
from preloaded.paths import Paths
from preloaded.server import budget, control, envdeps, keeper, pytestserver, sigfd, startup, tools
from preloaded.server.pytestlink import PytestLink
from preloaded.server.request import BadRequest, Conn, validate_request
from preloaded.server.shadowing import Shadows
from preloaded.server.context import Gate
from preloaded.server.peer import Cold, Peer, credentials
from preloaded.server.staleness import Stamps
from preloaded.server.standby import StandbyPool, kill, pool_size
from preloaded.server.stops import ClientStops

ALREADY_RUNNING = 3
KILL_GRACE = 0.5  # after SIGHUP, a child whose client is gone gets SIGKILL this much later
# Signals the client may forward; terminal-style ones go to the child's whole process group.
FORWARDABLE = {int(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                                signal.SIGUSR1, signal.SIGUSR2, signal.SIGSTOP, signal.SIGCONT,
                                signal.SIGTSTP, signal.SIGWINCH)}  # fmt: skip
# What a run that arrives while the server stops is told: the client retries with a new server.
RETRY = {"error": "stale", "reason": "the server is stopping"}
# A client cannot tell a signal sent to its process group (timeout, `kill -- -PGID`, a terminal)
# from one sent to it alone: these go to the run's whole group, so that nothing python's group
# would have lost is left running. SIGUSR1/SIGUSR2 (rarely a group's, and fatal by default to a
# program's helpers) reach the program alone.
GROUP_SIGNALS = {int(signal.SIGINT), int(signal.SIGQUIT), int(signal.SIGSTOP),
                 int(signal.SIGCONT), int(signal.SIGTSTP), int(signal.SIGTERM),
                 int(signal.SIGHUP)}  # fmt: skip


LOG_PROBLEMS: list = []  # why the log cannot be written (disk full, ...): shown by status


def log(message: str) -> None:
    # os.write, not sys.stderr: a full disk must neither raise in the loop nor pile up a buffer.
    line = time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n"
    try:
        os.write(2, line.encode("utf-8", "backslashreplace"))
    except OSError as exc:
        if not LOG_PROBLEMS:
            LOG_PROBLEMS.append(
                f"cannot write the log: {exc.strerror}. Runs are not affected, but the log misses"
                " why runs went cold; make room for it (`py-preload logs FILE` shows where),"
                " then `py-preload stop FILE`"
            )


class Server:
    def __init__(self, config: dict, startup: frozenset | None = None) -> None:
        self.config = config
        self.shadows = Shadows(startup, config.get("path"))  # see shadowing.Shadows
        self.paths = Paths(config["bundle"], flavour=config.get("flavour", ""))
        self.pytest_link = None if config.get("flavour") else PytestLink(config, log)  # see tools
        self.modules = list(config["modules"])
        self.idle_timeout = float(config.get("idle_timeout", 1800))
        self.started = time.time()
        self.runs = 0
        self.import_times: dict = {}
        self.warnings: list = []
        self.conns: dict = {}  # fd -> Conn
        self.children: dict = {}  # pid -> Conn
        self.listener: socket.socket | None = None
        self.info_ino = None  # our info file (a successor may have replaced it)
        self.lock_fds: list = []
        self.stopping = False
        self.stamps: Stamps | None = None
        self.last_active = time.monotonic()
        self.last_used = time.time()  # a run's start or end: the memory budget's "recently used"
        self.budget: budget.ServerBudget | None = None  # set once listening (main)
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        self.sigfd: int | None = None  # the server's signals with their senders (sigfd.py)
        self.child_setup = None
        self.learner = None  # preloaded.learn.Learner, made by preload()
        self.warmup_time: float | None = None
        self.pool = StandbyPool(pool_size(config), self._own_fds, log)
        self.stops = ClientStops()  # the children follow their clients' SIGSTOP and SIGCONT
        self.keeper = keeper.started_field()  # whose exit file a client reads if we die

    # -- start-up -------------------------------------------------------------------------

    def acquire_lock(self) -> bool:
        fd = startup.lock_bundle(self.paths.server_lock)
        if fd is None:
            return False
        self.lock_fds = [fd]  # children must not keep it held
        return True

    def preload(self) -> None:
        warm = startup.warm_up(self.config, self.paths, log)
        self.import_times, self.warnings = warm.import_times, warm.warnings
        self.warmup_time, self.learner, self.stamps = warm.warmup_time, warm.learner, warm.stamps
        self.child_setup = self.pool.setup = warm.child_setup

    def listen(self) -> None:
        tmp = f"{self.paths.socket}.{os.getpid()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(128)
        os.rename(tmp, self.paths.socket)  # atomic: replaces a stale socket of a dead server
        self.socket_ino = os.stat(self.paths.socket).st_ino
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, self._handle_accept)
        self.write_info()

    def write_info(self) -> None:
        info = {
            "pid": os.getpid(), "bundle": self.config["bundle"], "python": sys.executable,
            "modules": self.modules, "import_times": self.import_times,
            "warnings": self.warnings, "started": self.started, "socket": self.paths.socket,
            "log": self.paths.log, "idle_timeout": self.idle_timeout, "flavour": self.paths.flavour,
            "learned": list(self.learner.learned) if self.learner else [],
        }  # fmt: skip
        tmp = f"{self.paths.info}.{os.getpid()}.tmp"  # a retiring predecessor may write too
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f)
            self.info_ino = os.fstat(f.fileno()).st_ino
        os.replace(tmp, self.paths.info)

    def install_signals(self) -> None:
        self.sigfd = sigfd.install(self.sel, (self.wake_r, self.wake_w), self._handle_wakeup,
                                   self.children, log)  # a run's signal to its parent: relayed
        self.stamps.register(self.sel, log)  # an edit in place is seen between runs too

    # -- the loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        while not (self.stopping and not self.children):
            events = self.sel.select(self._timeout())
            for key, _mask in events:
                key.data(key.fileobj)
            self._check_deadlines()
            self.stops.check(self.children)
            self._check_socket()
            self._learn_step()
            if not events and self._refill_in() == 0.0:
                self.pool.idle_turn()
            if not events and self.budget is not None:
                self.budget.check_memory()

    def _can_learn(self) -> bool:
        """Learned modules are imported (probes forked) between runs, never while a run waits."""
        if self.stopping or self.learner is None or not self.learner.needs_turn():
            return False
        return all(conn.pid is not None for conn in self.conns.values())

    def _learn_step(self) -> None:
        """Import one learned module, or fork the probe that checks them first (one per loop
        turn: a client that comes waits for one)."""
        if not self._can_learn():
            return
        with envdeps.recording():  # a learned import reads the environment too
            outcome = self.learner.step(self._own_fds() + self.pool.channel_fds(), self.sel)
        if outcome == "unsafe":
            log("a learned module is not fork-safe: retiring; the next run starts without it")
            self.begin_stop()
        elif outcome in ("learned", "failed"):  # failed: after importing some dependencies?
            from preloaded.server import learn, preload

            preload.settle()  # gc.freeze() again: the new objects are shared copy-on-write too
            learn.remember_modules(self.child_setup)
            self.stamps.watch_new()  # an edit of a learned module's file counts too
            self.pool.discard_all()  # forked before the change: the next run gets a new fork
            if not self.learner.busy():
                self.write_info()

    def _timeout(self) -> float:
        if self._can_learn():
            return 0.0  # more to learn: look at the sockets, then import the next one
        now = time.monotonic()
        limits = [1.0, self.stops.due_in(self.children, now)]
        limits += [deadline - now for deadline in self.learner.deadlines()]
        for conn in self.conns.values():
            limits.append((conn.kill_at or conn.deadline) - now)
        for conn in self.children.values():  # closed connections whose child awaits SIGKILL
            if conn.kill_at is not None:
                limits.append(conn.kill_at - now)
        if not self.conns and not self.children:
            limits.append(self.last_active + self.idle_timeout - now)
        refill = self._refill_in(now)
        if refill is not None:
            limits.append(refill)
        return max(0.0, min(limits))

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns.values()):
            if conn.pid is None and now > conn.deadline:
                self._close(conn)
        for conn in list(self.children.values()):
            if conn.kill_at is not None and now >= conn.kill_at:
                kill(conn.pid, signal.SIGKILL, group=True)
                conn.kill_at = None
        self.learner.check_probe(now)
        if self.conns or self.children:
            self.last_active = now
        elif not self.stopping and now - self.last_active >= self.idle_timeout:
            log(f"idle for {self.idle_timeout:.0f} s: exiting")
            self.begin_stop()

    def _check_socket(self) -> None:
        """Retire when our socket file was removed or replaced: no run could reach us any more,
        and the next run's new server waits for our lock (see LOCK_WAIT)."""
        if self.listener is None or self.stopping:
            return
        try:
            ours = os.stat(self.paths.socket).st_ino == self.socket_ino
        except OSError:
            ours = False
        if not ours:
            log(f"socket {self.paths.socket} removed or replaced: retiring")
            self.begin_stop()

    def _handle_wakeup(self, _fileobj) -> None:
        try:
            signals = os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        for signum in signals:
            if signum == signal.SIGCHLD:
                self._reap()
            elif not self.stopping:
                control.terminated(self, signum, log)

    def _handle_accept(self, _fileobj) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: drop this round, keep serving
                log(f"accept failed: {exc}")
                return
            conn = Conn(sock)
            if not _admit(conn):
                log("refused a connection from another user")
                conn.reply({"error": "connection from another user refused"})
                self._close(conn)
                continue
            sock.setblocking(False)
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, self._handle_readable)

    def _handle_readable(self, sock) -> None:
        conn = self.conns.get(sock.fileno())
        if conn is None:
            return
        try:
            data, ancdata, flags, _ = sock.recvmsg(65536, wire.anc_space())
            conn.fds.extend(wire.unpack_fds(ancdata, flags))
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, wire.ProtocolError) as exc:
            self._conn_failed(conn, str(exc))
            return
        if not data:
            self._client_gone(conn)
            return
        conn.reader.feed(data)
        try:
            for frame in conn.reader.frames():
                self._handle_frame(conn, frame)
                if conn.closed:
                    return
        except wire.ProtocolError as exc:
            self._conn_failed(conn, str(exc))

    def _conn_failed(self, conn: Conn, message: str) -> None:
        """A broken connection: a request not yet run is refused; a running child's client is
        gone. (A client killed before it read "started" resets the connection: ECONNRESET, not
        EOF. Only refusing it left its child running, out of every client's reach.)"""
        if conn.pid is None:
            self._reject(conn, message)
            return
        log(f"connection of run {conn.pid} failed ({message}): ending the run")
        self._client_gone(conn)

    def _handle_frame(self, conn: Conn, frame) -> None:
        if conn.pid is not None:  # a running child: only signals may follow
            signum = frame.get("signal") if isinstance(frame, dict) else None
            if type(signum) is int and signum in FORWARDABLE:
                kill(conn.pid, signum, group=signum in GROUP_SIGNALS)
            return
        if isinstance(frame, dict) and "cmd" in frame:
            control.handle(self, conn, frame)
            return
        if _adopted(self, conn, frame):  # the pytest server: a run the plain server handed over
            return
        try:
            validate_request(frame, len(conn.fds))
        except BadRequest as exc:
            self._reject(conn, str(exc))
            return
        reason = self.stamps.changed()
        if reason:
            log(f"stale ({reason}): retiring; the next run starts a fresh server")
            # This run and any other waiting one get told to retry, after the socket is gone.
            self.begin_stop(retry={"error": "stale", "reason": reason})
            return
        if _sent_elsewhere(self, conn, frame):
            return self._close(conn)
        self._fork(conn, frame)

    def status(self) -> dict:
        return {
            "pid": os.getpid(), "uptime": round(time.time() - self.started, 1),
            "modules": self.modules, "import_times": self.import_times,
            "runs": self.runs, "children": sorted(self.children),
            "standby": (self.pool.pids() or [None])[0], "standbys": self.pool.pids(),
            "stale": self.stamps.changed() if self.stamps else None,
            "warnings": self.warnings + LOG_PROBLEMS,
            "bundle": self.config["bundle"], "python": sys.executable,
            "socket": self.paths.socket, "log": self.paths.log,
            "learn": self.learner.status() if self.learner else None,
            "warmup": self.config.get("warmup"), "warmup_time": self.warmup_time,
            "last_used": self.last_used, "env": envdeps.summary(), "flavour": self.paths.flavour,
        }  # fmt: skip

    def _fork(self, conn: Conn, request: dict) -> None:
        """Hand ``request`` to the parked standby (forking one now if none is parked)."""
        try:  # the fds stay in conn.fds meanwhile: a standby forked now must not keep them
            standby = self.pool.hand_over(request, conn.fds, conn.changes)
        except Cold as exc:  # the child could not take on the caller's context
            return self._close(GATE.tell_cold(conn, str(exc), log))
        except OSError as exc:  # EAGAIN (RLIMIT_NPROC, pids cgroup), ENOMEM: refuse this run only
            self._reject(conn, f"cannot fork: {exc.strerror}")  # closes conn.fds
            return
        wire.close_all(conn.fds)  # the standby holds its own copies now
        conn.fds = []
        self.runs += 1
        self.last_used = time.time()
        conn.pid = standby.pid
        self.children[standby.pid] = conn
        keeper.running(standby.pid)  # if we die, the keeper reaps it and publishes its status
        if conn.reply({"started": standby.pid, **self.keeper}):
            standby.go()
        else:  # its client may run the command cold: this one must not run it (reaped by _reap)
            kill(standby.pid, signal.SIGKILL, group=False)
            standby.channel.close()

    def _refill_in(self, now: float | None = None) -> float | None:
        """Seconds until the next standby should be forked (0: now); None if none is wanted.
        Not while learning: each learned import discards it."""
        if self.stopping or self._can_learn():
            return None
        return self.pool.refill_in(bool(self.children), time.monotonic() if now is None else now)

    def _own_fds(self) -> list:
        fds = [self.wake_r, self.wake_w, self.sel.fileno()]
        fds.extend([self.sigfd] if self.sigfd is not None else [])
        if self.listener is not None:
            fds.append(self.listener.fileno())
        fds.extend(self.conns)
        for conn in self.conns.values():  # a client's stdio, received and not yet handed over
            fds.extend(conn.fds)
            if conn.peer is not None and conn.peer.pidfd is not None:
                fds.append(conn.peer.pidfd)  # a child holding it would show it to the program
        fds.extend(self.lock_fds)
        fds.extend(self.stamps.fds() if self.stamps else ())  # the inotify fd
        fds.extend(self.learner.probe_fds() if self.learner else ())
        return fds

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.pool.died(pid, status) or _reaped_by_link(self, pid, status):
                continue
            conn = self.children.pop(pid, None)
            if conn is None:  # a fast-exit helper, or a discarded standby
                continue
            keeper.ended(pid)
            if self.learner is not None:  # every reaped run, whatever its connection became
                self.learner.collect(pid)
            code = os.waitstatus_to_exitcode(status)
            self.pool.last_exit = time.monotonic()
            self.last_used = time.time()
            if not conn.closed:
                conn.reply({"signal": -code} if code < 0 else {"exit": code})
                self._close(conn)

    def _client_gone(self, conn: Conn) -> None:
        """The client hung up: end its child (SIGHUP now, SIGKILL after a grace period)."""
        if conn.pid is not None and conn.pid in self.children:
            kill(conn.pid, signal.SIGHUP, group=True)
            kill(conn.pid, signal.SIGCONT, group=True)  # a stopped child must see the SIGHUP
            conn.kill_at = time.monotonic() + KILL_GRACE
        self._close(conn)

    def _reject(self, conn: Conn, message: str) -> None:
        log(f"bad request: {message}")
        conn.reply({"error": message})
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        wire.close_all(conn.fds)
        conn.fds = []
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.close()

    def begin_stop(self, kill_children: bool = False, retry: dict = RETRY) -> None:
        """Stop taking runs: the socket goes away at once, running children finish (or not).

        Runs not yet started get ``retry`` (a "stale" error): their clients start a new server.
        """
        self.stopping = True
        self.pool.discard_all()
        if self.learner is not None:
            self.learner.stop_probe()
        if self.listener is not None:
            # Only our own files: after the runtime dir was removed under us, a successor's are
            # there (removing its info file would hide it from `list` and `stop --all`).
            _unlink_if_ours(self.paths.socket, self.socket_ino)
            _unlink_if_ours(self.paths.info, self.info_ino)
            self.sel.unregister(self.listener)
            _drain_backlog(self.listener, retry)
            self.listener.close()
            self.listener = None
        for fd in self.lock_fds:  # closing it releases the flock: a new server may start
            os.close(fd)
        self.lock_fds = []
        for conn in list(self.conns.values()):
            if conn.pid is None:
                conn.reply(retry)
                self._close(conn)
        if kill_children:
            for pid, conn in self.children.items():
                kill(pid, signal.SIGHUP, group=True)
                conn.kill_at = time.monotonic() + KILL_GRACE

def _sent_elsewhere(server: Server, conn: Conn, request: dict) -> bool:
    """True when the pytest server took the run (it answers the client now), or when python
    itself must run it (cold; the reason is logged)."""
    where, reason = _route(server, conn, request)
    if where == "pytest":
        reason = server.pytest_link.hand_over(conn, request, _all_modules(server))
        if reason is None:
            return True
    if reason is not None:
        tools.send_cold(conn, reason, log)
        return True
    return (GATE.sent_back_cold(conn, request, log)
            or server.shadows.sent_back_cold(conn, request, server.child_setup.known, log)
            or envdeps.GATE.sent_back_cold(conn, request, log, server.begin_stop))


def _reaped_by_link(server: Server, pid: int, status: int) -> bool:
    return server.pytest_link is not None and server.pytest_link.reaped(pid, status)


def _route(server: Server, conn: Conn, request: dict) -> tuple:
    """("here" | "pytest", None) or ("cold", reason): see tools.route."""
    if server.pytest_link is None:  # the pytest server
        reason = pytestserver.cold_reason(request)
        if reason is None and pytestserver.is_pytest(request) and \
                pytestserver.wants_workers(request, tools.config_text(request["cwd"])):  # fmt: skip
            request["executable"] = server.config["bundle"]  # its workers: our children
        return ("cold", reason) if reason else ("here", None)
    if server.pytest_link.takes_worker(request, conn.peer):
        return "pytest", None
    return tools.route(request)


def _all_modules(server: Server) -> list:
    learned = list(server.learner.learned) if server.learner else []
    return server.modules + [name for name in learned if name not in server.modules]


def _adopted(server: Server, courier: Conn, frame) -> bool:
    """In the pytest server, a run the plain server handed over: the client's connection (the
    first fd) and its stdio, then its request, handled as if it came on that connection. False
    for any other frame."""
    if server.pytest_link is not None or not (isinstance(frame, dict) and "adopt" in frame):
        return False
    fds, courier.fds = courier.fds, []
    server._close(courier)
    request = frame.get("adopt")
    try:
        sock = socket.socket(fileno=fds[0]) if len(fds) == 4 else None
    except OSError:
        sock = None
    if sock is None or not isinstance(request, dict):
        wire.close_all(fds)
        log("bad request: a hand-over without a connection and 3 descriptors")
        return True
    conn = Conn(sock)
    conn.fds = fds[1:]
    if not _admit(conn):
        server._close(conn)
        return True
    sock.setblocking(False)
    server.conns[sock.fileno()] = conn
    server.sel.register(sock, selectors.EVENT_READ, server._handle_readable)
    server._handle_frame(conn, request)
    return True


def _drain_backlog(listener, retry: dict) -> None:
    """Runs queued on the listener would see a reset and go cold: tell them to retry."""
    while True:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        Conn(sock).reply(retry)
        sock.close()




GATE = Gate()  # each caller's process context, against the server's (see context.py)


def _admit(conn: Conn) -> bool:
    """Only our own uid may connect; its process is pinned at once (a pidfd)."""
    if not _peer_is_us(conn.sock):
        return False
    conn.peer = Peer(conn.sock)  # its context is read when its request comes
    return True


def _peer_is_us(sock: socket.socket) -> bool:
    try:
        _pid, uid, _gid = credentials(sock)
    except OSError:
        return False
    return uid == os.getuid()


def _unlink_if_ours(path: str, ino) -> None:
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


def _open_log(path: str) -> None:
    """Send fds 1 and 2 to the log (C libraries write there too); /dev/null if it cannot be."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if os.fstat(fd).st_size > 4 << 20:
            os.ftruncate(fd, 0)
    except OSError as exc:
        LOG_PROBLEMS.append(
            f"cannot open the log {path}: {exc.strerror}. Runs are not affected, but nothing is"
            " logged; make that path writable, then `py-preload stop FILE`"
        )
        fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _write_failure(paths: Paths, message: str) -> None:
    tmp = f"{paths.failed}.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(message + "\n")
        os.replace(tmp, paths.failed)
    except OSError:
        pass


def main(startup: frozenset | None = None) -> None:
    """``startup``: the modules the interpreter had before the boot imported anything (see
    spawn.server_argv): what python imports before ``sys.path[0]`` is set."""
    config = json.loads(sys.argv[1])
    os.chdir("/")
    server = Server(config, startup)
    _open_log(server.paths.log)
    if not server.acquire_lock():
        sys.exit(ALREADY_RUNNING)
    try:
        limits = budget.settings()
    except budget.BudgetError as exc:  # every run says so, and runs cold, until it is fixed
        _write_failure(server.paths, str(exc))
        log(f"start failed: {exc}")
        sys.exit(1)
    log(f"server {os.getpid()} for {config['bundle']}: importing {', '.join(server.modules)}")
    try:
        server.preload()
    except Exception as exc:
        from preloaded.server.preload import ForkUnsafe

        message = str(exc) if isinstance(exc, (ImportError, ForkUnsafe)) else repr(exc)
        _write_failure(server.paths, message)  # first: the log may be unwritable (disk full)
        log(f"start failed: {message}")
        import traceback

        try:
            traceback.print_exc()
        except OSError:
            pass
        sys.exit(1)
    server.install_signals()
    server.listen()
    log(f"serving on {server.paths.socket}")
    server.budget = budget.ServerBudget(server, limits, log)
    server.budget.start()
    try:
        server.serve()
    finally:
        server.begin_stop()
        log("stopped")
    os._exit(0)  # skip the interpreter's teardown, as children do


if __name__ == "__main__":
    main()

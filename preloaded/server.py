"""The warm server: import once, then fork a child per run, in one single-threaded selector loop.

Signal handlers only write to a wakeup pipe; all work happens in the loop. Every child is tied
to its connection: the exit status comes from ``waitpid`` and goes back over that connection,
and a connection that closes early takes its child down with it.

Forking is kept off a run's path: a child (the standby; ``bundle --standby N`` keeps N) is
forked ahead and parked in a read on a socketpair; a run is handed to it (request and stdio fds)
and the next standby is forked when the loop is idle again. With none (``--standby 0``,
``PY_PRELOAD_STANDBY=0``) a child is forked per run at its request.
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
from preloaded.staleness import Stamps

ALREADY_RUNNING = 3
FIRST_FRAME_TIMEOUT = 10.0  # a client that connects and never sends is dropped after this
# When to fork the next standby (measured on 2 cores, torch server): not during a run just
# handed over, which may be short (forking at once delayed its exit and won nothing), unless it
# lasts over REFILL_AFTER; and REFILL_AFTER_EXIT after a run's end, so that its client exits
# first (1-1.6 ms saved per run; 5 ms made back-to-back runs wait for the fork).
REFILL_AFTER = 0.05
REFILL_AFTER_EXIT = 0.002
MAX_STANDBYS = 64
HAND_OVER_TIMEOUT = 5.0  # a parked standby reads its request at once; this is only a safety net
KILL_GRACE = 0.5  # after SIGHUP, a child whose client is gone gets SIGKILL this much later
LOCK_WAIT = 5.0  # a new server waits this long for a retiring one (lost socket) to let go
MODES = ("script", "module", "code", "stdin", "repl")
STDIO = ("pipe", "pty", "closed")
# Signals the client may forward; terminal-style ones go to the child's whole process group.
FORWARDABLE = {int(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                                signal.SIGUSR1, signal.SIGUSR2, signal.SIGSTOP, signal.SIGCONT,
                                signal.SIGTSTP, signal.SIGWINCH)}  # fmt: skip
# What a run that arrives while the server stops is told: the client retries with a new server.
RETRY = {"error": "stale", "reason": "the server is stopping"}
GROUP_SIGNALS = {int(signal.SIGINT), int(signal.SIGQUIT), int(signal.SIGSTOP),
                 int(signal.SIGCONT), int(signal.SIGTSTP)}  # fmt: skip
# The server's own handlers. They stay blocked across fork: a signal reaching a child before it
# reset them would go through the server's wakeup pipe (shared after fork) and stop the server
# (seen when a client hangs up right after its request: its child gets SIGHUP at once).
HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


LOG_PROBLEMS: list = []  # why the log cannot be written (disk full, ...): shown by status


def log(message: str) -> None:
    # os.write, not sys.stderr: a full disk must neither raise in the loop nor pile up a buffer.
    line = time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n"
    try:
        os.write(2, line.encode("utf-8", "backslashreplace"))
    except OSError as exc:
        if not LOG_PROBLEMS:
            LOG_PROBLEMS.append(f"cannot write the log: {exc.strerror}; the server keeps serving")


class BadRequest(Exception):
    pass


def validate_request(req, nfds: int) -> None:
    """Raise BadRequest unless ``req`` is a well-formed run request with 3 descriptors."""
    if not isinstance(req, dict):
        raise BadRequest("request is not an object")
    expected = {"v", "mode", "target", "argv", "orig_argv", "cwd", "env", "umask", "flags", "stdio",
                "ignored"}
    unknown = set(req) - expected
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    missing = expected - set(req)
    if missing:
        raise BadRequest(f"missing field(s): {', '.join(sorted(missing))}")
    if req["v"] != 1:
        raise BadRequest(f"unsupported protocol version {req['v']!r}")
    if req["mode"] not in MODES:
        raise BadRequest(f"unknown mode {req['mode']!r}")
    if req["mode"] in ("script", "module", "code") and not isinstance(req["target"], str):
        raise BadRequest("target must be a string")
    _check_strings(req["argv"], "argv")
    _check_strings(req["orig_argv"], "orig_argv")
    if not isinstance(req["cwd"], str) or not isinstance(req["env"], dict):
        raise BadRequest("cwd must be a string and env an object")
    _check_strings(list(req["env"]) + list(req["env"].values()), "env")
    if type(req["umask"]) is not int or not 0 <= req["umask"] <= 0o777:
        raise BadRequest("umask must be an integer in 0..0o777")
    flags = req["flags"]
    if not isinstance(flags, dict) or set(flags) != {"u", "B", "i", "q", "W"}:
        raise BadRequest("flags must have exactly u, B, i, q, W")
    if not all(type(flags[k]) is bool for k in "uBiq"):
        raise BadRequest("flags u, B, i, q must be booleans")
    _check_strings(flags["W"], "flags.W")
    stdio = req["stdio"]
    if not isinstance(stdio, list) or len(stdio) != 3 or any(k not in STDIO for k in stdio):
        raise BadRequest("stdio must list 3 of pipe, pty, closed")
    ignored = req["ignored"]
    if not isinstance(ignored, list) or not all(type(s) is int and 0 < s < 65 for s in ignored):
        raise BadRequest("ignored must list signal numbers")
    if nfds != 3:
        raise BadRequest(f"expected 3 file descriptors, got {nfds}")


def _check_strings(value, name: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{name} must be a list of strings")
    if any("\0" in v for v in value):
        raise BadRequest(f"{name} contains a NUL character")


class Conn:
    """One client connection: at first waiting for its request, then tied to one child."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = wire.FrameReader()
        self.fds: list = []
        self.deadline = time.monotonic() + FIRST_FRAME_TIMEOUT
        self.pid: int | None = None
        self.kill_at: float | None = None
        self.closed = False


class Standby:
    """A child forked ahead and parked in a read on its end of ``channel``."""

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel


class Server:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.paths = Paths(config["bundle"])
        self.modules = list(config["modules"])
        self.idle_timeout = float(config.get("idle_timeout", 1800))
        self.started = time.time()
        self.runs = 0
        self.import_times: dict = {}
        self.warnings: list = []
        self.conns: dict = {}  # fd -> Conn
        self.children: dict = {}  # pid -> Conn
        self.listener: socket.socket | None = None
        self.lock = None
        self.info_ino = None  # our info file (a successor may have replaced it)
        self.lock_fds: list = []
        self.stopping = False
        self.stamps: Stamps | None = None
        self.last_active = time.monotonic()
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        self.child_setup = None
        self.learner = None  # preloaded.learn.Learner, made by preload()
        self.warmup_time: float | None = None
        self.standbys: list = []  # parked, oldest first
        self.pool_size = _standby_count(config)
        # The last standby could not be forked, or died parked: fork one only when a run comes.
        self.standby_failed = False
        self.last_hand_over = 0.0
        self.last_exit = 0.0

    # -- start-up -------------------------------------------------------------------------

    def acquire_lock(self) -> bool:
        # flock(2) directly, not filelock: the bundle's interpreter may have nothing installed
        # (its packages come from the overlay), and the server must still start there.
        fd = os.open(self.paths.server_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _flock_within(fd, LOCK_WAIT)
        except OSError:
            os.close(fd)
            return False
        self.lock = _FdLock(fd)
        self.lock_fds = [fd]  # children must not keep it held
        return True

    def preload(self) -> None:
        from preloaded import child, preload

        overlay = self.config.get("overlay")
        if overlay:  # installed by the starter: first, before the interpreter's own site-packages
            sys.path.insert(1, overlay)
        base_path = [p for p in sys.path[1:] if p != self.config["pkg_root"]]
        # Directories the modules were found in at bundle time (the caller's cwd or PYTHONPATH):
        # needed to import them here, but not part of a child's sys.path, as under python.
        sys.path[0:0] = self.config.get("path", [])
        baseline = preload.thread_count()
        self.import_times, suspects = preload.import_modules(self.modules, log)
        self._preload_learned()
        warm = self.config.get("warmup")
        if warm:
            from preloaded import warmup

            before = preload.thread_count()
            self.warmup_time = warmup.run(warm, log)
            if preload.thread_count() > before:
                suspects.append((f"the warm-up {warm}", preload.thread_count() - before))
        stdout = sys.__stdout__
        self.child_setup = child.Setup(base_path, stdout.encoding, stdout.errors)
        self._setup_learning(base_path, overlay)
        site = (overlay,) if overlay else ()  # removed or replaced: the server retires
        files = (warm,) if warm else ()  # an edited warm-up makes the server stale
        own = (self.config["pkg_root"],)
        self.stamps = Stamps.collect(self.config["bundle"], sys.executable, site, files, own)
        preload.settle()
        self.warnings = preload.thread_warnings(suspects, baseline)
        for warning in self.warnings:
            log("warning: " + warning)

    def _preload_learned(self) -> None:
        """Import what earlier servers of this bundle learned; restart without an unsafe one."""
        from preloaded import learn

        enabled = bool(self.config.get("learn", True))
        self.learner = learn.Learner(self.paths, self.config.get("learn_after", 2), enabled, log)
        if not enabled:
            return
        self.learner.clean_reports()
        self.learner.load()
        try:
            self.learner.preload()
        except learn.Unsafe:  # refused and saved: a fresh image of this server goes without it
            from preloaded.spawn import server_argv

            log("restarting without it")
            # Told by the environment too: if the refusal could not be saved (a read-only cache),
            # the fresh image would import it again, and restart again, forever.
            os.environ[learn.REFUSED_ENV] = ",".join(self.learner.refused)
            argv = server_argv(self.config, self.config["bundle"])  # sys.orig_argv is 3.10+
            os.execv(argv[0], argv)

    def _setup_learning(self, base_path: list, overlay) -> None:
        """What each child needs to report the library modules it imported."""
        from preloaded import learn

        setup = self.child_setup
        setup.known = frozenset(sys.modules)  # once here, not per fork: the diff's other side
        if self.learner.enabled:
            setup.roots = learn.library_roots(base_path, overlay)
            setup.learn_prefix = self.paths.report_prefix

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
            "log": self.paths.log, "idle_timeout": self.idle_timeout,
            "learned": list(self.learner.learned) if self.learner else [],
        }  # fmt: skip
        tmp = f"{self.paths.info}.{os.getpid()}.tmp"  # a retiring predecessor may write too
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f)
            self.info_ino = os.fstat(f.fileno()).st_ino
        os.replace(tmp, self.paths.info)

    def install_signals(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum in HANDLED:
            signal.signal(signum, lambda s, f: None)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._handle_wakeup)

    # -- the loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        while not (self.stopping and not self.children):
            events = self.sel.select(self._timeout())
            for key, _mask in events:
                key.data(key.fileobj)
            self._check_deadlines()
            self._check_socket()
            self._learn_step()
            if not events and self._refill_in() == 0.0:
                self._refill_standby()

    def _can_learn(self) -> bool:
        """Learned modules are imported between runs: never while a run waits to be forked."""
        if self.stopping or self.learner is None or not self.learner.pending:
            return False
        return all(conn.pid is not None for conn in self.conns.values())

    def _learn_step(self) -> None:
        """Import one learned module (one per loop turn: a client that comes waits for one)."""
        if not self._can_learn():
            return
        outcome = self.learner.step()
        if outcome == "unsafe":
            log("a learned module is not fork-safe: retiring; the next run starts without it")
            self.begin_stop()
        elif outcome is not None:  # learned, or failed after importing some of its dependencies
            from preloaded import preload

            preload.settle()  # gc.freeze() again: the new objects are shared copy-on-write too
            self.child_setup.known = frozenset(sys.modules)
            self.discard_standby()  # forked before the change: the next run gets a new fork
            if not self.learner.pending:
                self.write_info()

    def _timeout(self) -> float:
        if self._can_learn():
            return 0.0  # more to learn: look at the sockets, then import the next one
        now = time.monotonic()
        limits = [1.0]
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
                _kill(conn.pid, signal.SIGKILL, group=True)
                conn.kill_at = None
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
                log(f"got signal {signum}: stopping")
                self.begin_stop(kill_children=True)

    def _handle_accept(self, _fileobj) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: drop this round, keep serving
                log(f"accept failed: {exc}")
                return
            if not _peer_is_us(sock):
                log("refused a connection from another user")
                self._reply(Conn(sock), {"error": "connection from another user refused"})
                sock.close()
                continue
            sock.setblocking(False)
            conn = Conn(sock)
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
                _kill(conn.pid, signum, group=signum in GROUP_SIGNALS)
            return
        if isinstance(frame, dict) and "cmd" in frame:
            self._handle_command(conn, frame)
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
        self._fork(conn, frame)

    def _handle_command(self, conn: Conn, frame: dict) -> None:
        cmd = frame.get("cmd")
        if cmd == "status":
            self._reply(conn, self.status())
        elif cmd == "stop":
            self._reply(conn, {"stopping": os.getpid()})
            self._close(conn)
            self.begin_stop(kill_children=True)
        elif cmd == "forget":  # running children finish; the next run starts a fresh server
            if self.learner is not None:
                self.learner.forget()
            self._reply(conn, {"stopping": os.getpid()})
            self._close(conn)
            self.begin_stop()
        else:
            self._reply(conn, {"error": f"unknown command {cmd!r}"})
        self._close(conn)

    def status(self) -> dict:
        return {
            "pid": os.getpid(), "uptime": round(time.time() - self.started, 1),
            "modules": self.modules, "import_times": self.import_times,
            "runs": self.runs, "children": sorted(self.children),
            "standby": self.standbys[0].pid if self.standbys else None,
            "standbys": [standby.pid for standby in self.standbys],
            "stale": self.stamps.changed() if self.stamps else None,
            "warnings": self.warnings + LOG_PROBLEMS,
            "bundle": self.config["bundle"], "python": sys.executable,
            "socket": self.paths.socket, "log": self.paths.log,
            "learn": self.learner.status() if self.learner else None,
            "warmup": self.config.get("warmup"), "warmup_time": self.warmup_time,
        }  # fmt: skip

    def _fork(self, conn: Conn, request: dict) -> None:
        """Hand ``request`` to the parked standby (forking one now if none is parked)."""
        try:  # the fds stay in conn.fds meanwhile: a standby forked now must not keep them
            standby = self._hand_over(request, conn.fds)
        except OSError as exc:  # EAGAIN (RLIMIT_NPROC, pids cgroup), ENOMEM: refuse this run only
            self._reject(conn, f"cannot fork: {exc.strerror}")  # closes conn.fds
            return
        wire.close_all(conn.fds)  # the standby holds its own copies now
        conn.fds = []
        self.runs += 1
        conn.pid = standby.pid
        self.children[standby.pid] = conn
        self.last_hand_over = time.monotonic()
        if not self._reply(conn, {"started": standby.pid}):
            # A client that never heard "started" may run the command cold: this one must not
            # run it. Killed before the go (the SIGKILL is pending before the EOF is sent), and
            # reaped by _reap like any run.
            _kill(standby.pid, signal.SIGKILL, group=False)
        standby.channel.close()  # EOF is the "go": the client knows the run started

    def _hand_over(self, request: dict, fds: list) -> Standby:
        """Send the request and the caller's fds to a standby; return it. A standby that died
        while parked (its end of the channel is closed) is discarded and a fresh one tried."""
        for _attempt in range(3):
            standby = self.standbys.pop(0) if self.standbys else self._spawn_standby()
            try:
                standby.channel.settimeout(HAND_OVER_TIMEOUT)  # it reads at once: it is parked
                wire.send(standby.channel, request, fds)
                return standby
            except OSError as exc:
                log(f"standby {standby.pid} lost ({exc}): forking another")
                self._discard(standby)
        raise OSError(0, "every standby died before its hand-over")

    def _spawn_standby(self) -> Standby:
        """Fork a child that parks until a run is handed to it (see child.park)."""
        from preloaded import child

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        server_fds = self._own_fds() + [ours.fileno()]
        # A signal reaching the child before it dropped the server's handlers would wake the
        # server's loop through the wakeup pipe they share: blocked until child.park resets them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            try:
                child.park(theirs.fileno(), server_fds, self.child_setup, sigmask=mask)
            finally:
                os._exit(70)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        self.standby_failed = False
        return Standby(pid, ours)

    def _refill_standby(self) -> None:
        """Fork the next standby now, if one is wanted: the loop is idle, so that forking delays
        no run (the run just handed over, nor a run arriving). Whether one is wanted, and when,
        is ``_refill_in``'s to say."""
        try:
            self.standbys.append(self._spawn_standby())
        except OSError as exc:  # the next run forks on demand (and is refused if that fails)
            log(f"cannot fork a standby: {exc.strerror}")
            self.standby_failed = True

    def _refill_in(self, now: float | None = None) -> float | None:
        """Seconds until the next standby should be forked (0: now); None if none is wanted.

        On a small machine the fork competes with the runs and clients around it: not while a
        run just handed over is still going (for REFILL_AFTER at most), and REFILL_AFTER_EXIT
        after the last run ended. Not while learning either: each learned import discards it."""
        if len(self.standbys) >= self.pool_size or self.stopping:
            return None
        if self.standby_failed or self._can_learn():
            return None
        now = time.monotonic() if now is None else now
        if not self.children:
            return max(0.0, self.last_exit + REFILL_AFTER_EXIT - now)
        return max(0.0, self.last_hand_over + REFILL_AFTER - now)

    def discard_standby(self) -> None:
        """Kill and reap the parked standby, if any: the server's state changed (more imports,
        for instance), and the next run must get a child forked after that change. The next one
        is forked at the loop's next idle moment (or on demand by the next run)."""
        standbys, self.standbys = self.standbys, []
        for standby in standbys:
            self._discard(standby)
        self.standby_failed = False

    def _discard(self, standby: Standby) -> None:
        standby.channel.close()  # EOF: a standby that has not yet parked exits by itself
        _kill(standby.pid, signal.SIGKILL, group=False)
        try:
            os.waitpid(standby.pid, 0)
        except ChildProcessError:  # already reaped by _reap
            pass

    def _own_fds(self) -> list:
        fds = [self.wake_r, self.wake_w, self.sel.fileno()]
        if self.listener is not None:
            fds.append(self.listener.fileno())
        fds.extend(self.conns)
        for conn in self.conns.values():  # a client's stdio, received and not yet handed over
            fds.extend(conn.fds)
        fds.extend(self.lock_fds)
        fds.extend(standby.channel.fileno() for standby in self.standbys)  # its siblings' channels
        return fds

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            parked = [standby for standby in self.standbys if standby.pid == pid]
            if parked:
                log(f"standby {pid} died while parked ({_describe(status)})")
                parked[0].channel.close()
                self.standbys.remove(parked[0])
                self.standby_failed = True  # no fork storm if standbys keep dying: on demand
                continue
            conn = self.children.pop(pid, None)
            if conn is None:  # a fast-exit helper, or a discarded standby
                continue
            if self.learner is not None:  # every reaped run, whatever its connection became
                self.learner.collect(pid)
            code = os.waitstatus_to_exitcode(status)
            self.last_exit = time.monotonic()
            if not conn.closed:
                self._reply(conn, {"signal": -code} if code < 0 else {"exit": code})
                self._close(conn)

    def _client_gone(self, conn: Conn) -> None:
        """The client hung up: end its child (SIGHUP now, SIGKILL after a grace period)."""
        if conn.pid is not None and conn.pid in self.children:
            _kill(conn.pid, signal.SIGHUP, group=True)
            _kill(conn.pid, signal.SIGCONT, group=True)  # a stopped child must see the SIGHUP
            conn.kill_at = time.monotonic() + KILL_GRACE
        self._close(conn)

    def _reject(self, conn: Conn, message: str) -> None:
        log(f"bad request: {message}")
        self._reply(conn, {"error": message})
        self._close(conn)

    def _reply(self, conn: Conn, obj) -> bool:
        """Send ``obj``; False if the client could not be told (gone, or not reading)."""
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(1.0)  # a tiny frame; a client that never reads loses it
            wire.send(conn.sock, obj)
            return True
        except OSError:
            return False
        finally:
            try:
                conn.sock.setblocking(False)
            except OSError:
                pass

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
        conn.sock.close()

    def begin_stop(self, kill_children: bool = False, retry: dict = RETRY) -> None:
        """Stop taking runs: the socket goes away at once, running children finish (or not).

        Runs not yet started get ``retry`` (a "stale" error): their clients start a new server.
        """
        self.stopping = True
        self.discard_standby()
        if self.listener is not None:
            # Only our own files: after the runtime dir was removed under us, a successor's are
            # there (removing its info file would hide it from `list` and `stop --all`).
            _unlink_if_ours(self.paths.socket, self.socket_ino)
            _unlink_if_ours(self.paths.info, self.info_ino)
            self.sel.unregister(self.listener)
            self._drain_backlog(retry)
            self.listener.close()
            self.listener = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        for conn in list(self.conns.values()):
            if conn.pid is None:
                self._reply(conn, retry)
                self._close(conn)
        if kill_children:
            for pid, conn in self.children.items():
                _kill(pid, signal.SIGHUP, group=True)
                conn.kill_at = time.monotonic() + KILL_GRACE

    def _drain_backlog(self, retry: dict) -> None:
        """Runs queued on the listener would see a reset and go cold: tell them to retry."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self._reply(Conn(sock), retry)
            sock.close()


class _FdLock:
    """An flock held on an open descriptor; ``release`` closes it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def release(self) -> None:
        os.close(self.fd)


def _standby_count(config: dict) -> int:
    """How many standbys to keep parked: PY_PRELOAD_STANDBY=N in the server's environment (0:
    fork per run), else the bundle's config ``"standby"`` (a count, or false), else 1."""
    value = os.environ.get("PY_PRELOAD_STANDBY", "").strip().lower()
    if value in ("false", "no", "off"):
        return 0
    if value.isdigit():
        return min(int(value), MAX_STANDBYS)
    return min(int(config.get("standby", 1)), MAX_STANDBYS)


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {-code}" if code < 0 else f"exit {code}"


def _flock_within(fd: int, timeout: float) -> None:
    """flock(2) ``fd`` exclusively, waiting at most ``timeout`` (a retiring server's lock)."""
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _kill(pid: int, signum: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, signum)
            return
    except ProcessLookupError:
        pass  # not yet a group leader (setsid pending): fall through to the process itself
    except PermissionError:
        pass
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _peer_is_us(sock: socket.socket) -> bool:
    import struct

    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
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
        LOG_PROBLEMS.append(f"cannot open the log {path}: {exc.strerror}; logging to nowhere")
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


def main() -> None:
    config = json.loads(sys.argv[1])
    os.chdir("/")
    server = Server(config)
    _open_log(server.paths.log)
    if not server.acquire_lock():
        sys.exit(ALREADY_RUNNING)
    log(f"server {os.getpid()} for {config['bundle']}: importing {', '.join(server.modules)}")
    try:
        server.preload()
    except Exception as exc:
        from preloaded.preload import ForkUnsafe

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
    try:
        server.serve()
    finally:
        server.begin_stop()
        log("stopped")
    os._exit(0)  # skip the interpreter's teardown, as children do


if __name__ == "__main__":
    main()

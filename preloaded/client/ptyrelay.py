"""Terminal side of a warm run: a PTY for the child, raw-mode relay, window size, job control.

Stdlib only. The child gets the PTY's slave end as every stdio stream that was a terminal and
makes it its controlling terminal; this process copies bytes between the caller's terminal and
the master end. The caller's terminal attributes are restored on every way out.

Job control: the relay owns the caller's terminal (raw mode, reading keystrokes) only while this
process's group is the terminal's foreground, as ``python`` itself could only read it then. In
the background it only copies the child's output, and it stops the run where the kernel would
have stopped python: the child reading its PTY (SIGTTIN), or writing to it under
``stty tostop`` (SIGTTOU). Every SIGCONT (``fg``, ``bg``) looks again at who owns the terminal.
"""

from __future__ import annotations

import _signal
import errno
import fcntl
import os
import select
import termios

from preloaded.client.jobcontrol import foreground, reads_tty, tostop
from preloaded.client.signals import suspend

_WINSZ = b"\0" * 8
CHUNK = 1 << 16
DRAIN_GRACE = 0.2  # seconds to wait for the last output when something else still holds the PTY
# In the background, how often to look whether the child waits for input (or the terminal came
# back without a SIGCONT): the delay before a reading run shows as "Stopped (tty input)". A look
# costs ~0.9 ms for a 41-thread program (2-core Xeon): every 0.25 s that is ~0.4% of a core,
# paid by a background run whose stdin is the terminal (`train.py > log 2>&1 &`).
BACKGROUND_POLL = 0.25


class PtyRelay:
    """Owns the PTY of one run. ``kinds`` says which of fds 0, 1, 2 are terminals; ``ignored``
    the signals the caller ignored (a run that ignores SIGTTIN is not stopped for reading)."""

    def __init__(self, kinds: list, ignored=()) -> None:
        self.kinds = kinds
        self.ignored = frozenset(ignored)
        self.master, self.slave = os.openpty()
        self.slave_rdev = os.fstat(self.slave).st_rdev
        self.term_in = 0 if kinds[0] == "tty" else None  # where keystrokes come from
        self.term_out = next(fd for fd in (1, 2, 0) if kinds[fd] == "tty")  # where output goes
        self.attr_fd = self.term_in if self.term_in is not None else self.term_out
        self.saved = None  # the caller's attributes when we took the terminal: restored after
        self.slave_attrs = None  # what we last gave the PTY (the program may change it since)
        self.raw = False  # the caller's terminal is in raw mode: ours to read and to restore
        self.bg_modes = None  # the PTY's modes as the background found them (None: not looked)
        self.link = None  # the run's connection.Link, once it started
        self.child_pid = None
        try:
            attrs = termios.tcgetattr(self.attr_fd)  # allowed from the background too
            given = attrs if foreground(self.attr_fd) else _without_line_editor(attrs)
            termios.tcsetattr(self.slave, termios.TCSANOW, given)
            self.saved = attrs
            # As the PTY reports them (what later looks compare with), not as we asked.
            self.slave_attrs = self.bg_modes = termios.tcgetattr(self.slave)
        except termios.error:
            pass
        self.copy_winsize()
        self.take_terminal()

    def child_fds(self) -> list:
        return [self.slave if kind == "tty" else fd for fd, kind in zip((0, 1, 2), self.kinds)]

    def copy_winsize(self) -> None:
        try:
            size = fcntl.ioctl(self.attr_fd, termios.TIOCGWINSZ, _WINSZ)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)  # SIGWINCH only if it changed
        except OSError:
            pass

    def take_terminal(self) -> None:
        """In the foreground: raw mode on the caller's terminal, if we read keystrokes from it.

        Never from the background: setting attributes there stops us (SIGTTOU), and the
        terminal is the shell's (or another job's) to set. The attributes are read again each
        time: they are what the shell gave this job now, and what goes back when we let go.
        """
        if self.term_in is None or self.saved is None or self.raw:
            return
        if not foreground(self.term_in):
            return
        try:
            attrs = termios.tcgetattr(self.term_in)
        except termios.error:
            return
        self._follow_caller(attrs)
        self.saved = attrs
        try:
            termios.tcsetattr(self.term_in, termios.TCSANOW, _raw(attrs))  # keep type-ahead
            self.raw = True
            self.bg_modes = None
        except termios.error:
            pass
        self.copy_winsize()

    def _follow_caller(self, attrs: list) -> None:
        """Give the PTY the caller's current modes, unless the program set its own since.

        A job started with ``&`` copied the terminal while the shell's line editor had it
        (no echo, no canonical mode); python brought to the foreground reads the modes the
        shell restored for it, and so must the program.
        """
        try:
            # The master end reads and sets the PTY's attributes (the slave is the child's now).
            if termios.tcgetattr(self.master) != self.slave_attrs or attrs == self.slave_attrs:
                return
            termios.tcsetattr(self.master, termios.TCSANOW, attrs)
            self.slave_attrs = termios.tcgetattr(self.master)
        except termios.error:
            pass

    def restore(self) -> None:
        """Give the terminal back as we found it (only if we took it, and while we still may)."""
        if not self.raw:
            return
        self.raw = False
        if foreground(self.term_in):
            try:
                termios.tcsetattr(self.term_in, termios.TCSANOW, self.saved)
            except termios.error:
                pass

    def resume(self) -> None:
        """After SIGCONT: take the terminal back if it is ours again; the size may have changed."""
        if self.raw and not foreground(self.term_in):
            self.raw = False  # moved to the background while we held it: the shell has it now
        self.take_terminal()
        self.copy_winsize()

    def close(self) -> None:
        self.restore()
        for fd in (self.master,):
            try:
                os.close(fd)
            except OSError:
                pass

    def _suspend_char(self):
        """The byte that means Ctrl-Z for the program in the PTY now, or None."""
        try:
            attrs = termios.tcgetattr(self.master)
        except termios.error:
            return None
        if not attrs[3] & termios.ISIG:
            return None  # the program reads Ctrl-Z itself (raw mode): pass it through
        char = attrs[6][termios.VSUSP]
        return char if char not in (b"\0", 0) else None

    def run(self, link, wakeup_fd, parent_fd=None):
        """Relay until the child's status arrives; return it. The terminal is restored after.
        ``link``: the run's connection.Link. When ``parent_fd`` (a pidfd, see run.PARENT_FD) is
        readable: ("exit", 1)."""
        self.link, self.child_pid = link, link.pid
        try:
            return self._loop(link, wakeup_fd, parent_fd)
        finally:
            self.close()

    def _loop(self, link, wakeup_fd, parent_fd):
        os.set_blocking(self.master, False)
        to_child = b""
        reading_input = self.term_in is not None
        master_open = True
        while True:
            run_fd = link.fileno()  # the server's socket; the program's pidfd if the server died
            rlist = [run_fd, wakeup_fd] + ([parent_fd] if parent_fd is not None else [])
            if master_open:
                rlist.append(self.master)
            if self.raw and reading_input and len(to_child) < CHUNK:
                rlist.append(self.term_in)
            wlist = [self.master] if to_child and master_open else []
            # In the background nothing tells us when the child starts to read: look.
            timeout = BACKGROUND_POLL if self.term_in is not None and not self.raw else None
            try:
                ready, writable, _ = select.select(rlist, wlist, [], timeout)
            except InterruptedError:
                continue
            if parent_fd in ready:
                link.hang_up()
                return ("exit", 1)
            if self.master in ready:
                master_open = self._pump_output()
            if wakeup_fd in ready:
                self._handle_signals(link, wakeup_fd)
            if self.raw and self.term_in in ready:
                data = self._read_input()
                if data is None:
                    reading_input = False
                else:
                    to_child += self._filter_suspend(data, link)
            if writable and to_child:
                to_child = self._write_child(to_child)
            if timeout is not None and not self.raw and not to_child and master_open:
                self._watch_background()
            if run_fd in ready:
                status = link.read_status()
                if status:
                    if master_open:
                        self._drain()
                    return status

    def _watch_background(self) -> None:
        """In the background: follow the terminal coming back, and stop where python would."""
        if foreground(self.term_in):
            self.resume()  # brought to the foreground without a SIGCONT
            return
        self.copy_winsize()
        if self._modes_changed():
            self._stop_like(_signal.SIGTTOU)  # python's tcsetattr would be stopped
        elif self.child_pid and reads_tty(self.child_pid, self.slave_rdev):
            self._stop_like(_signal.SIGTTIN)  # python's read would be stopped: "(tty input)"

    def _modes_changed(self) -> bool:
        """True when the program set its terminal's modes since the run went to the background.

        python doing so from the background is stopped (SIGTTOU: readline preparing ``input()``,
        getpass, ``tty.setraw``). The program's PTY lets it: the change is seen after the fact,
        at the next look (every BACKGROUND_POLL). Output written before the change is shown
        first, as python's would have been; output written after it may be shown too.
        """
        if self.term_in is None:
            return False
        try:
            modes = termios.tcgetattr(self.master)
        except termios.error:
            return False
        changed = self.bg_modes is not None and modes != self.bg_modes
        self.bg_modes = modes
        return changed

    def _stop_like(self, signum: int) -> None:
        """Stop the run (child and client) as the kernel stops a background reader/writer."""
        if signum in self.ignored:
            return  # the caller ignores it: python would not stop either
        suspend(self.link, self, signum)

    def _pump_output(self) -> bool:
        """Copy what the child wrote to the caller's terminal; False once the PTY is closed."""
        try:
            data = os.read(self.master, CHUNK)
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno == errno.EIO:  # every slave end is closed
                return False
            raise
        if not data:
            return False
        if not self.raw:
            data = self._cooked(data)
        _write_all(self.term_out, data)
        return True

    def _cooked(self, data: bytes) -> bytes:
        """Output for a terminal that is not ours (background, or stdin not a terminal).

        Under ``stty tostop`` a background write stops python (SIGTTOU): so does this one. The
        terminal then does its own output processing on top of the PTY's: a newline the PTY
        already turned into CR LF would become CR CR LF, so it goes as the bare LF python wrote.
        """
        if self.link is not None and not foreground(self.term_out) and tostop(self.term_out):
            self._stop_like(_signal.SIGTTOU)
        if b"\r\n" in data and _onlcr(self.term_out) and _onlcr(self.master):
            data = data.replace(b"\r\n", b"\n")
        return data

    def _drain(self) -> None:
        """After the child ended: forward its last output, until EIO or a short quiet spell."""
        while True:
            ready, _, _ = select.select([self.master], [], [], DRAIN_GRACE)
            if not ready or not self._pump_output():
                return

    def _read_input(self):
        try:
            data = os.read(self.term_in, CHUNK)
        except BlockingIOError:
            return b""
        except OSError:
            return None
        return data or None

    def _filter_suspend(self, data: bytes, link) -> bytes:
        char = self._suspend_char()
        if char is None or char not in data or _signal.SIGTSTP in self.ignored:
            return data
        before, _, after = data.partition(char)
        if before:
            _write_all(self.master, before)
        suspend(link, self)
        return after

    def _write_child(self, data: bytes) -> bytes:
        try:
            written = os.write(self.master, data)
        except BlockingIOError:
            return data
        except OSError:
            return b""  # the child's side is gone; drop the keystrokes
        return data[written:]

    def _handle_signals(self, link, wakeup_fd) -> None:
        try:
            signals = os.read(wakeup_fd, 64)
        except BlockingIOError:
            return
        for signum in signals:
            if signum == _signal.SIGWINCH:
                self.copy_winsize()
            elif signum == _signal.SIGTSTP and signum not in self.ignored:
                suspend(link, self)
            elif signum == _signal.SIGCONT:
                self.resume()  # fg or bg: who owns the terminal now?
                link.send_signal(signum)
            else:
                link.send_signal(signum)


def _raw(attrs: list) -> list:
    mode = list(attrs)
    mode[0] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON)
    mode[1] &= ~termios.OPOST
    mode[2] &= ~(termios.CSIZE | termios.PARENB)
    mode[2] |= termios.CS8
    mode[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ISIG)
    mode[6] = list(mode[6])
    mode[6][termios.VMIN] = 1
    mode[6][termios.VTIME] = 0
    return mode


def _without_line_editor(attrs: list) -> list:
    """The modes the shell gives a job it brings to the foreground, from those of a terminal
    that the shell's line editor (readline) may have now: a job started with ``&`` copies them
    while the shell waits at its prompt. Readline turns off canonical mode, echo and CR-to-NL
    and disables ^V and ^O; the shell restores them before a job runs in the foreground.
    (A program's own readline, setting the same modes, is then seen setting them.)
    """
    if attrs[3] & (termios.ICANON | termios.ECHO):
        return attrs  # no line editor has it
    modes = list(attrs)
    modes[0] |= termios.ICRNL
    modes[3] |= termios.ICANON | termios.ECHO
    modes[6] = list(modes[6])
    for index, char in ((termios.VLNEXT, b"\x16"), (termios.VDISCARD, b"\x0f")):
        if modes[6][index] in (b"\0", 0):
            modes[6][index] = char
    return modes


def _onlcr(fd: int) -> bool:
    """True when the terminal on ``fd`` turns each LF it outputs into CR LF."""
    try:
        oflag = termios.tcgetattr(fd)[1]
    except termios.error:
        return False
    return oflag & (termios.OPOST | termios.ONLCR) == termios.OPOST | termios.ONLCR


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except OSError:
            return  # the terminal is gone (hung up): nothing left to show the output on
        view = view[written:]

"""Terminal side of a warm run: a PTY for the child, raw-mode relay, window size, job control.

Stdlib only. The child gets the PTY's slave end as every stdio stream that was a terminal and
makes it its controlling terminal; this process copies bytes between the caller's terminal and
the master end. The caller's terminal attributes are restored on every way out.
"""

from __future__ import annotations

import _signal
import errno
import fcntl
import os
import select
import termios

from preloaded.client.connection import read_status, send_signal
from preloaded.client.signals import suspend

_WINSZ = b"\0" * 8
CHUNK = 1 << 16
DRAIN_GRACE = 0.2  # seconds to wait for the last output when something else still holds the PTY


class PtyRelay:
    """Owns the PTY of one run. ``kinds`` says which of fds 0, 1, 2 are terminals."""

    def __init__(self, kinds: list) -> None:
        self.kinds = kinds
        self.master, self.slave = os.openpty()
        self.term_in = 0 if kinds[0] == "tty" else None  # where keystrokes come from
        self.term_out = next(fd for fd in (1, 2, 0) if kinds[fd] == "tty")  # where output goes
        self.attr_fd = self.term_in if self.term_in is not None else self.term_out
        self.saved = None
        try:
            attrs = termios.tcgetattr(self.attr_fd)
            termios.tcsetattr(self.slave, termios.TCSANOW, attrs)
            self.saved = attrs
        except termios.error:
            pass
        self.copy_winsize()
        self.enter_raw()

    def child_fds(self) -> list:
        return [self.slave if kind == "tty" else fd for fd, kind in zip((0, 1, 2), self.kinds)]

    def copy_winsize(self) -> None:
        try:
            size = fcntl.ioctl(self.attr_fd, termios.TIOCGWINSZ, _WINSZ)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
        except OSError:
            pass

    def enter_raw(self) -> None:
        """Raw mode on the caller's terminal, only if we read keystrokes from it."""
        if self.term_in is None or self.saved is None:
            return
        mode = list(self.saved)
        mode[0] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON)
        mode[1] &= ~termios.OPOST
        mode[2] &= ~(termios.CSIZE | termios.PARENB)
        mode[2] |= termios.CS8
        mode[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ISIG)
        mode[6] = list(mode[6])
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        try:
            termios.tcsetattr(self.term_in, termios.TCSANOW, mode)  # not FLUSH: keep type-ahead
        except termios.error:
            pass

    def restore(self) -> None:
        if self.term_in is not None and self.saved is not None:
            try:
                termios.tcsetattr(self.term_in, termios.TCSANOW, self.saved)
            except termios.error:
                pass

    def resume(self) -> None:
        self.enter_raw()
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

    def run(self, sock, reader, wakeup_fd):
        """Relay until the child's status arrives; return it. The terminal is restored after."""
        try:
            return self._loop(sock, reader, wakeup_fd)
        finally:
            self.close()

    def _loop(self, sock, reader, wakeup_fd):
        sock_fd = sock.fileno()
        os.set_blocking(self.master, False)
        to_child = b""
        reading_input = self.term_in is not None
        master_open = True
        while True:
            rlist = [sock_fd, wakeup_fd]
            if master_open:
                rlist.append(self.master)
            if reading_input and len(to_child) < CHUNK:
                rlist.append(self.term_in)
            wlist = [self.master] if to_child and master_open else []
            try:
                ready, writable, _ = select.select(rlist, wlist, [])
            except InterruptedError:
                continue
            if self.master in ready:
                master_open = self._pump_output()
            if wakeup_fd in ready:
                self._handle_signals(sock, wakeup_fd)
            if self.term_in is not None and self.term_in in ready:
                data = self._read_input()
                if data is None:
                    reading_input = False
                else:
                    to_child += self._filter_suspend(data, sock)
            if writable and to_child:
                to_child = self._write_child(to_child)
            if sock_fd in ready:
                status = read_status(sock, reader)
                if status:
                    if master_open:
                        self._drain()
                    return status

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
        _write_all(self.term_out, data)
        return True

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

    def _filter_suspend(self, data: bytes, sock) -> bytes:
        char = self._suspend_char()
        if char is None or char not in data:
            return data
        before, _, after = data.partition(char)
        if before:
            _write_all(self.master, before)
        suspend(sock, self)
        return after

    def _write_child(self, data: bytes) -> bytes:
        try:
            written = os.write(self.master, data)
        except BlockingIOError:
            return data
        except OSError:
            return b""  # the child's side is gone; drop the keystrokes
        return data[written:]

    def _handle_signals(self, sock, wakeup_fd) -> None:
        try:
            signals = os.read(wakeup_fd, 64)
        except BlockingIOError:
            return
        for signum in signals:
            if signum == _signal.SIGWINCH:
                self.copy_winsize()
            elif signum == _signal.SIGTSTP:
                suspend(sock, self)
            elif signum == _signal.SIGCONT:
                self.resume()
            else:
                send_signal(sock, signum)


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

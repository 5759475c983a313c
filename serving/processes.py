"""A served process's life, written once: a free port, a start with its output in a log, a wait
until it answers, and a stop of it and every process under it within seconds.

`serve()` does all three and hands back a Server (its URL and key); every server the project
starts (azmlinfsrv, `deploy_model.py --local`, `pf flow serve`, the Agent Framework chat) is
started through it, the tests' fixtures through its parts.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests
from tqdm import tqdm

STOP_GRACE_S = 5
LOG_EVERY_S = 30  # a bar written to a file (a log, not a terminal): one line at most this often


class NotLive(RuntimeError):
    """The server exited, or did not answer in time, while starting; the message ends with its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind `port` now; as gunicorn binds, connections in TIME_WAIT don't count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen()
        except OSError:
            return False
    return True


def start(command, log: Path | None = None, env: dict | None = None, cwd: Path | None = None,
          **popen) -> subprocess.Popen:
    """Start `command` in a session of its own (Ctrl-C in a terminal reaches it only through stop()),
    its output into `log` (None: inherited), with our environment changed by `env` (a None value unsets)."""
    output = open(log, "w") if log is not None else None
    environment = {name: value for name, value in {**os.environ, **(env or {})}.items() if value is not None}
    try:
        return subprocess.Popen(
            [str(part) for part in command], cwd=cwd, env=environment, stdout=output,
            stderr=subprocess.STDOUT if output else None, start_new_session=True, **popen,
        )
    finally:
        if output is not None:
            output.close()  # the child holds its own copy


def log_tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not Path(log).exists():
        return ""
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])


class LogLines:
    """tqdm's stream when the output is a file (a log, a pipe): each refresh on a line of its own, not over the
    last one with \\r."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def waiting_bar(desc: str | None) -> tqdm:
    """A bar of the time waited so far on stderr, refreshed live in a terminal, every LOG_EVERY_S in a log
    (`desc` None: none)."""
    terminal = sys.stderr.isatty()
    return tqdm(desc=desc, disable=desc is None, bar_format="{desc}: {elapsed} waited",
                file=sys.stderr if terminal else LogLines(sys.stderr), mininterval=0.5 if terminal else LOG_EVERY_S)


def wait_until_live(process: subprocess.Popen, url: str, timeout: float = 600, log: Path | None = None,
                    progress: str | None = None) -> float:
    """Poll `url` until it answers 200; return the seconds it took. NotLive if the process exits first
    or `timeout` passes. `progress`: what a bar of the wait says (None: no bar)."""
    started = time.monotonic()
    with waiting_bar(progress) as bar:
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise NotLive(f"exited with code {process.returncode} while starting\n{log_tail(log)}".rstrip())
            try:
                if requests.get(url, timeout=5).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.25)
            bar.update()
    raise NotLive(f"not live at {url} after {timeout:.0f} s\n{log_tail(log)}".rstrip())


def stop(process: subprocess.Popen, grace_s: float = STOP_GRACE_S, sig: int = signal.SIGTERM) -> int:
    """Stop `process` as a person would (`sig`: SIGTERM, or SIGINT for Ctrl-C), then, after `grace_s`,
    kill whatever is left of it and of every process under it; return its exit code.

    A server's worker in the middle of a generation does not return to Python until it ends
    (minutes for a long answer on a CPU): hence the kill.
    """
    try:
        family = psutil.Process(process.pid).children(recursive=True)  # now: orphans leave the tree
    except psutil.NoSuchProcess:
        family = []
    if process.poll() is None:
        try:
            process.send_signal(sig)
            process.wait(timeout=grace_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    for member in [*family, process]:
        try:
            member.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    code = process.wait()
    psutil.wait_procs(family, timeout=grace_s)
    return code


@dataclass
class Server:
    """A live server: its process, the URL to call and the key that URL asks for (None: none), its log,
    and the seconds it took to be live. stop(), or the end of a `with` block, stops it and its workers."""

    process: subprocess.Popen
    url: str
    key: str | None = None
    log: Path | None = None
    live_s: float = 0.0
    stop_signal: int = signal.SIGTERM

    def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        return stop(self.process, grace_s, self.stop_signal)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(command, live_url: str, url: str | None = None, key: str | None = None, log: Path | None = None,
          env: dict | None = None, cwd: Path | None = None, timeout: float = 600, stop_signal: int = signal.SIGTERM,
          progress: str | None = None, **popen) -> Server:
    """Start `command` (as start()) and wait until `live_url` answers (`progress`: a bar's words): the live
    Server at `url` (default: `live_url`) with `key`. NotLive if it does not come up; then, as on Ctrl-C
    meanwhile, it is stopped."""
    process = start(command, log, env, cwd, **popen)
    try:
        live_s = wait_until_live(process, live_url, timeout, log, progress)
    except BaseException:
        stop(process, sig=stop_signal)
        raise
    return Server(process, url or live_url, key, log, live_s, stop_signal)

"""How the `qwen3` model learns that its tritonserver is shutting down.

Triton (2.51) does not count a decoupled model's requests as in flight once `execute` has returned, so on
SIGTERM it unloads the model at once, while the Python backend waits for those requests' final responses
before it calls `finalize`: a long stream would keep the server up until --exit-timeout-secs, and then
tritonserver exits "immediately" (and crashes on the way). So the model watches its server's readiness
endpoint (found on tritonserver's command line): once the server has been ready and then is not (or
closes that endpoint, as it does at once on SIGTERM), it is shutting down, and the model drains: no new requests, a bounded time for the running ones to finish, then
a final UNAVAILABLE response for each one left."""

from __future__ import annotations

import faulthandler
import os
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass
class ServerWatch:
    ready_url: str | None  # None: no HTTP endpoint to watch
    exit_timeout_s: float = 30.0

    @classmethod
    def of_parent(cls) -> ServerWatch | None:
        """From the parent tritonserver's command line; None when the parent is not tritonserver."""
        ppid = os.getppid()
        try:
            with open(f"/proc/{ppid}/comm", encoding="utf-8") as f:
                if not f.read().startswith("tritonserver"):
                    return None
            with open(f"/proc/{ppid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            return None
        return cls.of_args(args)

    @classmethod
    def of_args(cls, args: list[str]) -> ServerWatch:
        opts: dict[str, str] = {}
        for a in args:
            if a.startswith("--") and "=" in a:
                key, value = a[2:].split("=", 1)
                opts[key] = value
        exit_timeout = float(opts.get("exit-timeout-secs", 30))
        if opts.get("allow-http", "true").lower() in ("false", "0"):
            return cls(None, exit_timeout)
        host = opts.get("http-address", "0.0.0.0")
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return cls(f"http://{host}:{opts.get('http-port', '8000')}/v2/health/ready", exit_timeout)

    def ready(self, timeout_s: float = 1.0) -> bool | None:
        """True / False as the server answers, False too when it refuses the connection (on SIGTERM
        tritonserver closes its HTTP endpoint at once); None when it does not answer in time."""
        if self.ready_url is None:
            return None
        try:
            with urllib.request.urlopen(self.ready_url, timeout=timeout_s) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False
        except urllib.error.URLError as e:
            return False if isinstance(e.reason, ConnectionRefusedError) else None
        except ConnectionRefusedError:
            return False
        except (OSError, ValueError):
            return None


def exit_with_parent(poll_s: float = 0.5) -> None:
    """In a Python-backend stub whose parent is tritonserver: make sure this process ends when tritonserver
    dies (the stub is re-parented), so that no orphan keeps the model's memory. A no-op under any other
    parent. The watchdog is a separate /bin/sh process: a thread here could wait forever for the GIL, which
    the stub's C++ side may hold while it talks to a dead server (seen: orphans alive after 30 s)."""
    import subprocess

    if ServerWatch.of_parent() is None:
        return
    stub, server = os.getpid(), os.getppid()
    script = (f'while [ -d /proc/{stub} ] && [ "$(cut -d" " -f4 /proc/{stub}/stat 2>/dev/null)" = "{server}" ]; '
              f"do sleep {poll_s}; done; "
              f'if [ -d /proc/{stub} ]; then echo "qwentrt: tritonserver is gone; ending the model process" >&2; '
              f"kill -9 {stub}; fi")
    subprocess.Popen(["/bin/sh", "-c", script], stdin=subprocess.DEVNULL, start_new_session=True,
                     close_fds=True)


def stacks_later(seconds: float | None) -> None:
    """Write every thread's stack to stderr if this process is still going `seconds` from now (None: cancel):
    a stop that hangs until tritonserver's exit timeout then says where in the log. Best effort: a stderr without
    a file descriptor just means no stacks."""
    try:
        if seconds is None:
            faulthandler.cancel_dump_traceback_later()
        else:
            faulthandler.dump_traceback_later(seconds, exit=False)
    except (AttributeError, OSError, RuntimeError, ValueError):
        pass

"""Find tritonserver (on PATH, or the one the nvidia-pytriton wheel ships) and run it: start with
ports and options, wait until the models are ready, stop cleanly (SIGTERM lets Triton drain)."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwentrt.errors import QwentrtError


class ServerError(QwentrtError):
    """tritonserver is missing, failed to start, or its models did not become ready."""


@dataclass(frozen=True)
class TritonBinary:
    executable: Path
    backend_dir: Path | None  # None: the binary's own default
    env: dict[str, str] = field(default_factory=dict)


def find_tritonserver() -> TritonBinary:
    """$QWENTRT_TRITONSERVER, else `tritonserver` on PATH, else nvidia-pytriton's bundled server."""
    explicit = os.environ.get("QWENTRT_TRITONSERVER") or shutil.which("tritonserver")
    if explicit:
        exe = Path(explicit).resolve()
        for backends in (Path("/opt/tritonserver/backends"), exe.parent.parent / "backends"):
            if (backends / "python").is_dir():
                return TritonBinary(exe, backends)
        return TritonBinary(exe, None)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("no tritonserver found: install the server extra (pip install 'qwentrt[server]', which "
                          "brings nvidia-pytriton and its tritonserver), or put tritonserver on PATH")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    exe = root / "bin" / "tritonserver"
    if not exe.is_file():
        raise ServerError(f"nvidia-pytriton is installed but has no tritonserver at {exe}")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    env = {"LD_LIBRARY_PATH": _ld_path(libs)}
    backends = _pytriton_backends(root)
    python_dir = stub_python_dir(backends / "python" / "triton_python_backend_stub", env["LD_LIBRARY_PATH"],
                                 backends / "bin")
    if python_dir:
        env["PATH"] = f"{python_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return TritonBinary(exe, backends, env)


def stub_python_dir(stub: Path, ld_library_path: str, link_dir: Path) -> Path | None:
    """A folder holding `python3`, a link to the interpreter of the libpython the stub links, to put first on
    tritonserver's PATH; None where that cannot be found. The stub's embedded Python is isolated (it ignores
    PYTHONHOME) and takes the first `python3` on PATH as its home: in an activated virtual environment of another
    build of the same Python version (pyenv's 3.11.7 over Debian's 3.11.2 libpython, say) that is the other build's
    standard library, whose compiled modules then fail to load (`_ssl`: undefined symbol _PyModule_Add)."""
    try:
        out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, timeout=20,
                             env=dict(os.environ, LD_LIBRARY_PATH=ld_library_path)).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for line in out.splitlines():
        name, _, target = line.strip().partition(" => ")
        if not (name.startswith(f"lib{version}.so") and target.startswith("/")):
            continue
        for prefix in Path(target.split()[0]).resolve().parents:
            interpreter = prefix / "bin" / version
            if (prefix / "lib" / version / "os.py").is_file() and os.access(interpreter, os.X_OK):
                link = link_dir / "python3"
                if not link.is_symlink() or Path(os.readlink(link)) != interpreter:
                    link_dir.mkdir(parents=True, exist_ok=True)
                    tmp = link_dir / f".python3.{os.getpid()}.tmp"
                    tmp.unlink(missing_ok=True)
                    tmp.symlink_to(interpreter)
                    os.replace(tmp, link)  # (atomic: a server starting beside this one sees one or the other)
                return link_dir
    return None


def _pytriton_backends(root: Path) -> Path:
    """A backend folder whose Python backend uses the stub built for this Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton ships no Python-backend stub for Python {version}")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwentrt" / "triton-backends" / version
    python = cache / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in [root / "backends" / "python" / "libtriton_python.so",
                root / "backends" / "python" / "triton_python_backend_utils.py", stub]:
        dst = python / src.name
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime or dst.stat().st_size != src.stat().st_size:
            # copy, then rename over: a running server may be executing the old stub (ETXTBSY on a copy in
            # place); the rename leaves it its file, and two servers refreshing at once each rename whole files
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
    return cache


def _ld_path(libs: Path) -> str:
    current = os.environ.get("LD_LIBRARY_PATH")
    return f"{libs}:{current}" if current else str(libs)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports: all bound at once (ports asked for one after another can come back the same,
    and tritonserver refuses to start when its gRPC and HTTP ports are equal)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# Triton's protocol groups that can change the server or read its files and memory: never open to
# whoever can reach the port. Model control is off too (--model-control-mode=none).
RESTRICTED = "model-repository,model-config,shared-memory,logging,trace"
KEY_HEADER = "qwentrt-key"
GRPC_KEY_HEADER = f"triton-grpc-protocol-{KEY_HEADER}"  # what gRPC clients send (Triton adds the prefix)


@dataclass
class ServerOptions:
    repository: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    log_verbose: int = 0
    exit_timeout_s: int = 30
    # Key for the restricted protocol groups (RESTRICTED): gRPC clients send it as header
    # triton-grpc-protocol-qwentrt-key, HTTP clients as qwentrt-key. None: a random key nobody knows,
    # so that those groups are locked.
    restricted_key: str | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # added to tritonserver's environment


class TritonServer:
    """A tritonserver process over a model repository."""

    def __init__(self, options: ServerOptions, log_file: Path | None = None):
        self.options = options
        self.binary = find_tritonserver()
        self.log_file = log_file
        self.process: subprocess.Popen | None = None
        self._log = None
        self._lock_key = secrets.token_urlsafe(32)  # used when no key is given: the groups stay locked

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def command(self) -> list[str]:
        o = self.options
        cmd = [str(self.binary.executable), f"--model-repository={Path(o.repository).resolve()}",
               f"--grpc-port={o.grpc_port}", f"--http-port={o.http_port}", f"--metrics-port={o.metrics_port}",
               f"--grpc-address={o.host}", f"--http-address={o.host}", "--model-control-mode=none",
               f"--exit-timeout-secs={o.exit_timeout_s}", f"--log-verbose={o.log_verbose}", "--allow-metrics=true"]
        if self.binary.backend_dir is not None:
            cmd.append(f"--backend-directory={self.binary.backend_dir}")
        key = o.restricted_key or self._lock_key
        cmd += [f"--grpc-restricted-protocol={RESTRICTED}:{KEY_HEADER}={key}",
                f"--http-restricted-api={RESTRICTED}:{KEY_HEADER}={key}"]
        return cmd + list(o.extra_args)

    def start(self) -> "TritonServer":
        env = dict(os.environ, **self.binary.env, **self.options.env)
        self._log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        return self

    def wait_ready(self, models: tuple[str, ...] = ("qwen3",), timeout_s: float = 600) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting"
                                      f"{self._log_tail()}")
                try:
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                        return
                except Exception:
                    pass
                time.sleep(0.5)
        finally:
            client.close()
        raise ServerError(f"tritonserver's models {', '.join(models)} were not ready after {timeout_s:.0f} s"
                          f"{self._log_tail()}")

    def _log_tail(self, lines: int = 15) -> str:
        if not self.log_file or not Path(self.log_file).is_file():
            return ""
        tail = Path(self.log_file).read_text(errors="replace").splitlines()[-lines:]
        return ":\n  " + "\n  ".join(tail)

    def stop(self, timeout_s: float | None = None) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s or self.options.exit_timeout_s + 15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

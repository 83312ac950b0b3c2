"""Start and stop a real ComfyUI server with this node pack installed, for tests and demos.

    from comfyui_nested_diffusion.tools.comfy_server import ComfyServer

    with ComfyServer() as server:                  # temp base dir, free port, CPU, previews on
        print(server.url, server.port, server.base_dir, server.log_path)
        ...                                        # e.g. tools.comfy_api_client.ComfyAPIClient(server.url)

The server runs ``<python> <comfyui>/main.py --cpu --listen 127.0.0.1 --port P --base-directory DIR
--disable-auto-launch --preview-method auto`` in its own process. ``DIR`` holds ``custom_nodes/
comfyui-nested-diffusion`` (a symlink to this repository), ``models/``, ``input/``, ``output/``, ``temp/``
and ``user/`` (plus the server's sqlite database where ComfyUI supports ``--database-url``), so the
ComfyUI checkout itself is never written to. The server log goes to ``DIR/comfyui.log``.

ComfyUI is found like tests/conftest.py finds it (tools/comfy_env.py): $COMFYUI_PATH, else the path recorded in
the environment's ``comfyui_path`` (``.nested_env/``, or ``.nested_env_033/`` when its venv runs this), else its
``ComfyUI/``. The interpreter: the ``python`` argument, else $COMFYUI_PYTHON, else that environment's
``venv/bin/python`` when it exists, else this interpreter.

Run it by hand: ``scripts/python.sh -m comfyui_nested_diffusion.tools.comfy_server [--port 8188] [--base-dir DIR] [--gpu]`` (Ctrl-C or SIGTERM
stops it). If the server fails to start, a temp base dir is kept so that its log can be read.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence, Union

from comfyui_nested_diffusion.tools.comfy_env import comfyui_path, env_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "comfyui-nested-diffusion"
BASE_SUBDIRS = ("custom_nodes", "models", "models/vae", "models/vae_approx", "models/checkpoints",
                "input", "output", "temp", "user")

__all__ = ["ComfyServer", "ComfyServerError", "comfyui_path", "default_python", "free_port"]


class ComfyServerError(RuntimeError):
    """The server did not start (the message ends with the tail of its log)."""


def default_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv_python = env_dir() / "venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the usual bind-to-0 trick; another process could still
    take it before the server binds it, which then fails to start with 'address already in use')."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _supported_flags(comfy_dir: Path) -> str:
    try:
        return (comfy_dir / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    except OSError:
        return ""


class ComfyServer:
    """A ComfyUI server process with this pack installed; a context manager (``start`` / ``stop``).

    base_dir: the ComfyUI base directory; a new temp directory (removed by ``stop`` unless ``keep_base_dir``)
        when None. An existing one is reused: its ``custom_nodes/comfyui-nested-diffusion`` must be missing
        or already be a link to this repository.
    port: the port; a free one when None. host: the address to listen on.
    preview_method: ``--preview-method`` ("auto", "latent2rgb", "taesd", "none"; None leaves it out):
        "auto" makes samplers send preview images over the websocket.
    cpu: pass ``--cpu``. extra_args: more command-line arguments for main.py.
    startup_timeout: seconds to wait for ``/object_info`` to answer.
    comfyui: the ComfyUI checkout, python: the interpreter (defaults: see the module docstring).
    env: extra environment variables for the server process.
    keep_base_dir: keep the temp base dir after ``stop`` (a given base_dir is never removed).
    pack_dir: the node pack to install (default: this repository). extra_custom_nodes: more custom node files or
        folders to link into ``custom_nodes`` (the tests' own test-only nodes).

    After ``start``: ``url`` ("http://127.0.0.1:P"), ``port``, ``base_dir`` (Path), ``log_path`` (Path),
    ``process`` (subprocess.Popen), ``command`` (list), ``startup_seconds``.
    """

    def __init__(self, base_dir: Union[str, Path, None] = None, port: Optional[int] = None, *,
                 host: str = "127.0.0.1", preview_method: Optional[str] = "auto", cpu: bool = True,
                 extra_args: Sequence[str] = (), startup_timeout: float = 120.0,
                 comfyui: Union[str, Path, None] = None, python: Optional[str] = None,
                 env: Optional[dict] = None, keep_base_dir: bool = False,
                 pack_dir: Union[str, Path, None] = None, extra_custom_nodes: Sequence[Union[str, Path]] = ()):
        self.pack_dir = Path(pack_dir).resolve() if pack_dir else REPO_ROOT
        self.extra_custom_nodes = [Path(path).resolve() for path in extra_custom_nodes]
        self.comfyui = Path(comfyui).resolve() if comfyui else comfyui_path()
        self.python = python or default_python()
        self.host = host
        self.port = port
        self.preview_method = preview_method
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self._given_base_dir = Path(base_dir).resolve() if base_dir else None
        self._owns_base_dir = base_dir is None and not keep_base_dir
        self.base_dir: Optional[Path] = self._given_base_dir
        self.log_path: Optional[Path] = None
        self.process: Optional[subprocess.Popen] = None
        self.command: list[str] = []
        self.startup_seconds: Optional[float] = None
        self._log_file = None

    # -- properties ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path else ""
        except OSError:
            return ""

    # -- setup --------------------------------------------------------------------------------------
    def prepare_base_dir(self) -> Path:
        """Create the base directory layout and link this repository in as a custom node."""
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="comfy-nested-"))
        for sub in BASE_SUBDIRS:
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PACK_DIR_NAME
        if link.is_symlink() or link.exists():
            if not (link.is_symlink() and link.resolve() == self.pack_dir):
                raise ComfyServerError(f"{link} exists and is not a link to {self.pack_dir}: remove it or use another base_dir")
        else:
            link.symlink_to(self.pack_dir, target_is_directory=True)
        for extra in self.extra_custom_nodes:
            extra_link = self.base_dir / "custom_nodes" / extra.name
            if not extra_link.is_symlink() and not extra_link.exists():
                extra_link.symlink_to(extra, target_is_directory=extra.is_dir())
        return self.base_dir

    def build_command(self) -> list[str]:
        main_py = self.comfyui / "main.py"
        if not main_py.exists():
            raise ComfyServerError(f"No ComfyUI at {self.comfyui} (set COMFYUI_PATH or run scripts/setup_env.sh)")
        flags = _supported_flags(self.comfyui)
        command = [self.python, str(main_py), "--listen", self.host, "--port", str(self.port),
                   "--base-directory", str(self.base_dir), "--disable-auto-launch"]
        if self.cpu:
            command.append("--cpu")
        if self.preview_method:
            command += ["--preview-method", self.preview_method]
        if "--database-url" in flags and "--database-url" not in self.extra_args:
            # Keep the server's sqlite database out of the shared ComfyUI checkout.
            command += ["--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"]
        return command + self.extra_args

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        """Start the server and wait until ``/object_info`` answers; raises ComfyServerError with the log."""
        if self.running:
            return self
        self.prepare_base_dir()
        if self.port is None:
            self.port = free_port(self.host)
        self.command = self.build_command()
        self.log_path = self.base_dir / "comfyui.log"
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"$ {' '.join(self.command)}\n".encode())
        self._log_file.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        started = time.monotonic()
        self.process = subprocess.Popen(self.command, cwd=str(self.comfyui), stdout=self._log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        atexit.register(self.stop)
        try:
            self._wait_until_up(started)
        except BaseException:
            self.stop(remove_base_dir=False)
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_until_up(self, started: float) -> None:
        deadline = started + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise ComfyServerError(f"ComfyUI exited with code {code} while starting "
                                       f"(log: {self.log_path}):\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/object_info", timeout=10) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ComfyServerError(f"ComfyUI did not answer {self.url}/object_info within "
                                       f"{self.startup_timeout:.0f} s (log: {self.log_path}):\n{self._log_tail()}")
            time.sleep(0.5)

    def _log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 15.0, remove_base_dir: Optional[bool] = None) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout`` s); remove a temp base dir we made."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        atexit.unregister(self.stop)
        if remove_base_dir is None:
            remove_base_dir = self._owns_base_dir
        if remove_base_dir and self.base_dir is not None and self.base_dir.exists():
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_on_sigterm() -> None:
    """Make SIGTERM (``kill``) raise KeyboardInterrupt, like Ctrl-C, so that ``with ComfyServer()`` stops the server."""
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run ComfyUI with the nested-diffusion pack installed.")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--base-dir", default=None, help="ComfyUI base directory (default: a temp one)")
    parser.add_argument("--gpu", action="store_true", help="do not pass --cpu")
    parser.add_argument("--preview-method", default="auto")
    args = parser.parse_args(argv)
    server = ComfyServer(args.base_dir, args.port, cpu=not args.gpu, preview_method=args.preview_method,
                         keep_base_dir=args.base_dir is not None)
    stop_on_sigterm()
    with server:
        print(f"ComfyUI up at {server.url} in {server.startup_seconds:.1f} s (base dir {server.base_dir}, "
              f"log {server.log_path}); Ctrl-C stops it", flush=True)
        try:
            while server.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

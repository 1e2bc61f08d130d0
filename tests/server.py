"""Start and stop a real Chipi server process for tests: `python -m app serve` on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]
# Long enough that a reply of this many tokens outlasts the disconnect grace and the waits of the tests that stop,
# drop or resume a running reply (about 2 s on the 2-core machine with the quantized default model), short enough
# that the suite stays quick.
TEST_MAX_NEW_TOKENS = 160
LONG_REPLY_TOKENS = 800  # the long_reply_server's limit (its prompts get the rest of TEST_CONTEXT_WINDOW)
TEST_MAX_PROMPT_CHARS = 4000
TEST_CONTEXT_WINDOW = 1024
TEST_GRACE_SECONDS = 1.0
TEST_MAX_AUDIO_BYTES = 2_000_000  # small, so the 413 for a recording over the limit is quick to provoke
TEST_MAX_AUDIO_SECONDS = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ChipiServer:
    """A server process with test settings: greedy decoding, short replies, small limits."""

    def __init__(self, database_url: str, *, stderr: IO[bytes] | None = None, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "CHIPI_HOST": "127.0.0.1",
            "CHIPI_PORT": str(self.port),
            "CHIPI_TEMPERATURE": "0",
            "CHIPI_MAX_NEW_TOKENS": str(TEST_MAX_NEW_TOKENS),
            "CHIPI_MAX_PROMPT_CHARS": str(TEST_MAX_PROMPT_CHARS),
            "CHIPI_CONTEXT_WINDOW": str(TEST_CONTEXT_WINDOW),
            "CHIPI_DISCONNECT_GRACE_SECONDS": str(TEST_GRACE_SECONDS),
            "CHIPI_SHUTDOWN_GRACE_SECONDS": "2",  # a server stopped with replies running does not hold the tests up
            "CHIPI_WS_HEARTBEAT_SECONDS": "1",
            "CHIPI_MAX_AUDIO_BYTES": str(TEST_MAX_AUDIO_BYTES),
            "CHIPI_MAX_AUDIO_SECONDS": str(TEST_MAX_AUDIO_SECONDS),
            "CHIPI_LOG_LEVEL": "warning",
            # Model titles are generated in the background after a first reply, so tests that check titles or
            # count generations would race with them; tests/test_titles.py runs a server with them on.
            "CHIPI_AUTO_TITLE": "first-message",
            **settings,
        }
        self.stderr = stderr  # where the server's logs go (the access log included); by default, the tests' stderr
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120, *, until: str = "/api/health", poll_seconds: float = 0.2) -> None:
        """Start the process and wait until `until` answers 200: by default until the models are loaded."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"], cwd=ROOT, env=self.env, stderr=self.stderr
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode} during start-up")
            try:
                if httpx.get(f"{self.url}{until}", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(poll_seconds)
        self.stop()
        raise TimeoutError(f"the server did not answer within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as in a power cut or an OOM kill."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ChipiServer:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

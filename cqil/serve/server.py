"""uvicorn serving one engine's app on a socket we bind ourselves (so port 0 gives a free port, and
an address in use is one clear error before anything starts).

    with Server(engine, port=0).start() as server:     # in a thread (tests, embedding)
        openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    Server(engine, host, port).run()                    # in the foreground (cqil-serve)
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

from cqil.errors import CqilError
from cqil.serve.app import Service, build_app


def listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except (OSError, UnicodeError) as e:
        raise CqilError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None


class Server:
    def __init__(self, engine, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                 max_batch: int = 32, max_queue: int = 256, access_log: bool = False):
        import uvicorn

        self.service = Service(engine, model_name or Path(engine.dir).name, max_batch, max_queue)
        self.socket = listen(host, port)
        bound = self.socket.getsockname()
        shown = f"[{bound[0]}]" if self.socket.family == socket.AF_INET6 else bound[0]
        self.url = f"http://{shown}:{bound[1]}"
        config = uvicorn.Config(build_app(self.service), log_config=None, access_log=access_log, lifespan="on",
                                timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self):
        """Serve until interrupted (uvicorn handles SIGINT / SIGTERM: in-flight requests end first)."""
        logging.getLogger("cqil").info(
            f"serving {self.service.model_name} on {self.url}/v1 (max batch {self.service.max_batch} sequences, "
            f"max queue {self.service.batcher.max_queue} requests)")
        self.uvicorn.run(sockets=[self.socket])

    def start(self, timeout: float = 60.0) -> "Server":
        """Serve from a thread; returns once requests are answered."""
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]},
                                        name="cqil-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise CqilError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self):
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

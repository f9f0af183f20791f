"""httpbin (PyPI), an origin nobody here wrote, served on 127.0.0.1 by werkzeug in threads."""

from __future__ import annotations

import threading
from typing import Any

from werkzeug.serving import WSGIRequestHandler, make_server


class _Quiet(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class HttpbinServer:
    def __init__(self) -> None:
        from httpbin import app

        self.server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_Quiet)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def start(self) -> HttpbinServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

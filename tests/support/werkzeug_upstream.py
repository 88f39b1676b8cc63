"""Flask (Werkzeug) on gunicorn as a real upstream: it answers with what Flask read.

``app`` is the WSGI application (gunicorn loads ``tests.support.werkzeug_upstream:app``);
:func:`start_flask` runs it as its own process on a free loopback port. Each answer
is JSON with exactly what the handler saw through Flask's own API:
``request.form``, ``request.args``, ``request.get_json()`` and ``request.files``
(every value of every name, in order: ``form["amount"][0]`` is what
``request.form["amount"]`` returns), and the gateway's ``X-Auth-Rule``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, request

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0

app = Flask(__name__)


@app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
@app.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def report(path: str) -> Response:
    try:
        document: Any = request.get_json(silent=True)
    except RecursionError:  # Flask's json has no depth limit of its own
        document = "<too deep>"
    seen = {
        "path": "/" + path,
        "rule": request.headers.get("X-Auth-Rule"),
        "form": {name: request.form.getlist(name) for name in request.form},
        "args": {name: request.args.getlist(name) for name in request.args},
        "json": document,
        "files": {
            name: [f.filename for f in request.files.getlist(name)] for name in request.files
        },
    }
    # default=str: Flask's json reads numbers as floats; repr keeps 1e999 as "inf".
    return Response(json.dumps(seen, default=str), mimetype="application/json")


@dataclass
class FlaskUpstream:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_flask(port: int) -> FlaskUpstream:
    """gunicorn with one sync worker serving ``app`` on 127.0.0.1:``port``; fails if it won't."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--log-level",
            "warning",
            "tests.support.werkzeug_upstream:app",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as answer:
                if answer.status == 200:
                    return FlaskUpstream(url, process)
        except OSError:
            time.sleep(0.1)
    FlaskUpstream(url, process).stop()
    raise RuntimeError(f"gunicorn did not answer on {url} within {START_TIMEOUT_S} s")

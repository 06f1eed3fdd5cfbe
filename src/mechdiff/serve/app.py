"""The explorer's web app (Starlette, served by uvicorn): one page, a JSON API over the served runs.

Routes: ``/`` (the page), ``/static/<asset>`` (the package's own JS/CSS), ``/api/runs``,
``/api/runs/{run}/overview``, ``/api/runs/{run}/texts[/{idx}]``, ``/api/runs/{run}/file/{path}``,
``/api/compare``, ``/api/live/{run}`` (POST JSON) and ``/api/live/{run}/status``. Every response
carries a strict Content-Security-Policy (scripts from this server only, no inline code); the Host
header must name this machine (no DNS rebinding); a POST must be JSON (no cross-site form posts).
"""
from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from mechdiff.errors import ConfigError, MechdiffError
from mechdiff.serve.live import Ask, Busy, Sessions
from mechdiff.serve.runs import PathRefused, RunSet

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript", "charts.js": "text/javascript", "figures.js": "text/javascript",
          "pages.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
#: a run's own files (report.html: inline styles, data: images) open sandboxed: no script runs
FILE_CSP = "sandbox; default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'"
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}
LIVE_FIELDS = {"prompt", "new_tokens", "top", "chat", "handle", "layer", "k", "alpha", "mode", "side"}


def _error(e: Exception) -> JSONResponse:
    status = 403 if isinstance(e, PathRefused) else 429 if isinstance(e, Busy) else 400
    return JSONResponse({"error": str(e)}, status_code=status, headers=HEADERS)


def make_app(run_dirs: Sequence[str | Path], device: str = "cpu", hosts: Sequence[str] = ()) -> Starlette:
    """The app over ``run_dirs`` (checked now: a bad directory is a ConfigError before anything binds)."""
    runs = RunSet(run_dirs)
    sessions = Sessions(device)

    def js(data) -> JSONResponse:
        return JSONResponse(data, headers=HEADERS)

    def run_of(request: Request):
        try:
            return runs.get(int(request.path_params["run"]))
        except ValueError:
            raise ConfigError("a run is named by its number") from None

    def guarded(fn):
        def endpoint(request: Request):
            try:
                return fn(request)
            except MechdiffError as e:
                return _error(e)
        return endpoint

    def page(request: Request):
        return FileResponse(STATIC / "index.html", headers=HEADERS, media_type="text/html")

    def asset(request: Request):
        name = request.path_params["name"]
        if name not in ASSETS:
            return JSONResponse({"error": "no such asset"}, status_code=404, headers=HEADERS)
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)

    def run_list(request: Request):
        return js([r.info(i) for i, r in enumerate(runs.runs)])

    def overview(request: Request):
        return js(run_of(request).overview())

    def texts(request: Request):
        return js(run_of(request).text_list())

    def text(request: Request):
        return js(run_of(request).text(int(request.path_params["idx"])))

    def file(request: Request):
        p = run_of(request).safe_path(request.path_params["path"])
        if not p.is_file():
            return JSONResponse({"error": "no such file in the run"}, status_code=404, headers=HEADERS)
        return FileResponse(p, headers={**HEADERS, "Content-Security-Policy": FILE_CSP, "Content-Disposition": "inline"})

    def compare(request: Request):
        return js(runs.compare())

    def live_status(request: Request):
        run = run_of(request)
        return js(sessions.for_manifest(run.manifest).status)

    async def live(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(ConfigError("send the live request as application/json"))
        try:
            body = await request.json()
        except ValueError:
            return _error(ConfigError("the live request is not JSON"))
        if not isinstance(body, dict) or set(body) - LIVE_FIELDS:
            return _error(ConfigError(f"the live request takes only {', '.join(sorted(LIVE_FIELDS))}"))
        try:
            run = run_of(request)
            handle = body.pop("handle", None)
            q = Ask(**{k: v for k, v in body.items() if v is not None and v != ""},
                    handle=run.handle_prefix(handle) if handle else None)
            return js(await run_in_threadpool(sessions.for_manifest(run.manifest).ask, q))
        except (MechdiffError, TypeError) as e:
            return _error(e if isinstance(e, MechdiffError) else ConfigError(str(e)))

    routes = [Route("/", page), Route("/static/{name}", asset), Route("/api/runs", run_list),
              Route("/api/runs/{run}/overview", guarded(overview)), Route("/api/runs/{run}/texts", guarded(texts)),
              Route("/api/runs/{run}/texts/{idx:int}", guarded(text)),
              Route("/api/runs/{run}/file/{path:path}", guarded(file)), Route("/api/compare", guarded(compare)),
              Route("/api/live/{run}/status", guarded(live_status)), Route("/api/live/{run}", live, methods=["POST"])]
    allowed = ["*"] if any(h in ("0.0.0.0", "::") for h in hosts) else ["127.0.0.1", "localhost", *hosts]
    return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed)])


def run_app(app: Starlette, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve ``app`` at http://host:port until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level="warning")


def serve(run_dirs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8765, device: str = "cpu") -> None:
    """Serve ``run_dirs`` at http://host:port until interrupted (127.0.0.1 unless told otherwise)."""
    run_app(make_app(run_dirs, device=device, hosts=[host]), host, port)


def serve_in_thread(app: Starlette, host: str = "127.0.0.1") -> tuple[str, "object", threading.Thread]:
    """Start ``app`` on a free port in a daemon thread (tests, screenshots): ``(url, server, thread)``;
    stop it with ``server.should_exit = True``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    for _ in range(200):
        if server.started:
            break
        threading.Event().wait(0.05)
    return f"http://{host}:{sock.getsockname()[1]}", server, th

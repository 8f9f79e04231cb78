"""The web labeller (`collect-prefs --serve`): a team labels the run's pairs in their browsers.

One secret link per annotator and one for the admin; the link's token is held in an HttpOnly, SameSite
cookie after the first visit. Pages are rendered on the server (Jinja2, escaped: model text is text), with
one small static script for the keys. Every label goes through the same fsynced LabelLog as the terminal
labeller before the page moves on; handlers run one at a time on the event loop, so concurrent annotators
append whole lines, never interleaved ones. State changes only by POST with a CSRF token; bodies are
size-limited; failed tokens are rate-limited per client; no path or file name comes from a request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from dpo_cli.data.labels import LabelLog
from dpo_cli.data.prefs import Pair, agreement, build_records, preference_stats, shown_swapped
from dpo_cli.data.thumbs import Item, build_thumb_records, thumb_stats

COOKIE = "dpo_cli_token"
MAX_BODY = 16 * 1024  # a label form is a few hundred bytes; a reason at most MAX_REASON characters
MAX_REASON = 1000
FAILED_TOKENS = 20  # per client and minute, then 429
HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # the first request carries the token in its URL
    "cache-control": "no-store",
}
CHOICES = {"left", "right", "tie", "skip"}
THUMB_CHOICES = {"up", "down", "skip"}
MESSAGES = {"undone": "your last label was undone", "nothing": "nothing to undo"}  # the only texts a URL can put on a page


@dataclass
class Desk:
    """What the server serves: the pairs, each annotator's queue, the label log, and who holds which token."""

    units: dict[str, Pair | Item]  # what is labelled: pairs, or single responses (collect.mode: thumbs), by id
    queues: dict[str, list[str]]  # annotator -> pair ids, in their order
    log: LabelLog
    seed: int
    tokens: dict[str, str]  # token -> annotator name; ADMIN for the admin
    csrf_key: bytes
    records: Any  # () -> (records, counts): prefs.jsonl as the labels stand now
    train_hint: list[str]  # the commands that train on this run dir
    failures: dict[str, deque] = field(default_factory=dict)
    cookie: str = COOKIE  # serve() names it after the port: servers on one host do not overwrite each other's

    @property
    def thumbs(self) -> bool:
        return any(isinstance(unit, Item) for unit in self.units.values())


ADMIN = "\x00admin"  # no annotator name can be this (names are [A-Za-z0-9._-])


def load_tokens(path: Path, annotators: list[str]) -> dict[str, str]:
    """token -> name, kept in RUN/serve-tokens.json (mode 600) so links survive a restart; new names get new
    tokens, from `secrets`."""
    import os

    from dpo_cli.core.errors import UserError

    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
        by_name = {str(name): str(token) for token, name in saved.items()}
    except (ValueError, AttributeError):
        raise UserError(f"{path}: not a tokens file dpo-cli wrote; delete it to issue new links (the old ones stop working)") from None
    for name in [ADMIN, *annotators]:
        by_name.setdefault(name, secrets.token_urlsafe(24))
    tokens = {token: name for name, token in by_name.items() if name == ADMIN or name in annotators}
    temporary = path.with_suffix(".tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even for a moment
    with os.fdopen(handle, "w") as out:
        out.write(json.dumps(tokens))
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    return tokens


def csrf_for(desk: Desk, token: str) -> str:
    return hmac.new(desk.csrf_key, token.encode(), hashlib.sha256).hexdigest()


def who(desk: Desk, token: str | None) -> str | None:
    """The holder of a token, compared in constant time against every token; None when it is nobody's."""
    found = None
    for known, name in desk.tokens.items():
        if token is not None and secrets.compare_digest(known.encode(), token.encode()):
            found = name
    return found


def too_many_failures(desk: Desk, client: str) -> bool:
    for known in [c for c, times in desk.failures.items() if not times or times[-1] < time.monotonic() - 60]:
        del desk.failures[known]  # a minute without a failure: forgotten
    recent = desk.failures.setdefault(client, deque())
    while recent and recent[0] < time.monotonic() - 60:
        recent.popleft()
    return len(recent) >= FAILED_TOKENS


def failed(desk: Desk, client: str) -> None:
    desk.failures.setdefault(client, deque()).append(time.monotonic())


def progress(desk: Desk, name: str) -> tuple[int, int, str | None]:
    """Labelled, assigned, and the next pair this annotator has not labelled (None: done)."""
    standing = desk.log.active()
    queue = desk.queues.get(name, [])
    pending = [pair_id for pair_id in queue if (pair_id, name) not in standing]
    return len(queue) - len(pending), len(queue), pending[0] if pending else None


def parse_form(body: bytes) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True).items()}


def admin_view(desk: Desk) -> dict[str, Any]:
    """The admin page's numbers: progress and rate per annotator, agreement, tie / skip rates, biases, and the
    pairs two annotators decided differently."""
    standing = desk.log.active_events()
    records, counts = desk.records()
    units = list(desk.units.values())
    stats = thumb_stats(units, standing, records, counts) if desk.thumbs else preference_stats(units, standing, records, counts)  # type: ignore[arg-type]
    hour_ago = time.time() - 3600
    rows = []
    for name, queue in desk.queues.items():
        labels = [e for e in standing if e["annotator"] == name]
        recent = [e for e in labels if _epoch(e["time"]) >= hour_ago]
        done, total, _ = progress(desk, name)
        counts = stats["per_annotator"].get(name, {})
        rate = lambda choice: f"{counts.get(choice, 0) / len(labels):.0%}" if labels else "-"  # noqa: E731
        rows.append({"name": name, "done": done, "total": total, "last_hour": len(recent), "ties": rate("tie"), "skips": rate("skip")})
    by_pair: dict[str, dict[str, str]] = {}
    for event in standing:
        if event["choice"] != "skip":
            by_pair.setdefault(event["pair_id"], {})[event["annotator"]] = event["choice"]
    disagreements = [
        {"unit": desk.units[unit_id], "choices": choices}
        for unit_id, choices in by_pair.items() if len(set(choices.values())) > 1 and unit_id in desk.units
    ]  # fmt: skip
    return {"annotators": rows, "stats": stats, "agreement": agreement(standing), "disagreements": disagreements[:50], "hint": desk.train_hint, "thumbs": desk.thumbs}


def _epoch(stamp: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0


def build_app(desk: Desk) -> Any:
    """The Starlette app: / (a link's token -> its cookie), /label, /undo, /admin, /admin/prefs.jsonl and the
    two static files."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from starlette.applications import Starlette
    from starlette.datastructures import MutableHeaders
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Route

    pages = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True, default_for_string=True))
    static = {name: (HERE / "static" / name).read_bytes() for name in ("label.js", "style.css")}

    def page(template: str, status: int = 200, **values: Any) -> HTMLResponse:
        return HTMLResponse(pages.get_template(template).render(**values), status_code=status)

    def refused(request: Request, status: int, message: str) -> Response:
        return page("message.html", status, title="Not allowed" if status in (401, 403) else "Error", message=message)

    def client_of(request: Request) -> str:
        return request.client.host if request.client else "?"

    def holder(request: Request) -> str | None:
        """Who the cookie belongs to; a cookie that is nobody's counts as a wrong token (rate-limited too)."""
        cookie = request.cookies.get(desk.cookie)
        name = who(desk, cookie)
        if cookie is not None and name is None:
            failed(desk, client_of(request))
        return name

    def limited(request: Request) -> Response | None:
        if too_many_failures(desk, client_of(request)):
            return refused(request, 429, "Too many wrong links from this address; wait a minute.")
        return None

    async def read_form(request: Request) -> dict[str, str] | None:
        """The POSTed form, or None when it is too large or not the holder's (CSRF)."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            return None
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return None
        form = parse_form(body)
        token = request.cookies.get(desk.cookie) or ""
        return form if secrets.compare_digest(form.get("csrf", "").encode(), csrf_for(desk, token).encode()) else None

    def annotator(request: Request) -> tuple[str, Response | None]:
        """The annotator holding the request's cookie, or the response refusing it (rate limit, 401, 403)."""
        if (stop := limited(request)) is not None:
            return "", stop
        name = holder(request)
        if name is None or name == ADMIN:
            return "", refused(request, 401 if name is None else 403, "Open your own labelling link first.")
        return name, None

    async def enter(request: Request) -> Response:
        if (stop := limited(request)) is not None:
            return stop
        token = request.query_params.get("token")
        name = who(desk, token) if token else holder(request)
        if name is None:
            if token:
                failed(desk, client_of(request))
            return refused(request, 401, "This link is not valid. Ask for your own link.")
        response = RedirectResponse("/admin" if name == ADMIN else "/label", status_code=303)
        if token:  # Lax, not Strict: a link clicked in a mail or chat page must arrive with its cookie (POSTs need the CSRF token)
            response.set_cookie(desk.cookie, token, httponly=True, samesite="lax", secure=request.url.scheme == "https", path="/")
        return response

    async def label_page(request: Request) -> Response:
        name, stop = annotator(request)
        if stop is not None:
            return stop
        done, total, next_id = progress(desk, name)
        if next_id is None:
            return page("done.html", done=done, total=total, name=name, csrf=csrf_for(desk, request.cookies[desk.cookie]))
        unit = desk.units[next_id]
        turns = unit.prompt if isinstance(unit.prompt, list) else [{"role": "prompt", "content": unit.prompt}]
        shared = {"name": name, "done": done, "total": total, "pair_id": next_id, "turns": turns, "csrf": csrf_for(desk, request.cookies[desk.cookie]),
                  "message": MESSAGES.get(request.query_params.get("m", ""), "")}  # fmt: skip
        if isinstance(unit, Item):
            return page("thumbs.html", response=unit.response.strip(), **shared)
        swapped = shown_swapped(desk.seed, unit.pair_id, name)
        left, right = (unit.b, unit.a) if swapped else (unit.a, unit.b)
        return page("label.html", left=left.strip(), right=right.strip(), **shared)

    async def label_post(request: Request) -> Response:
        name, stop = annotator(request)
        if stop is not None:
            return stop
        form = await read_form(request)
        if form is None:
            return refused(request, 403, "The form was refused (too large, or not from your page): reload the page.")
        pair_id, choice, reason = form.get("pair_id", ""), form.get("choice", ""), form.get("reason", "").strip()[:MAX_REASON]
        if choice not in (THUMB_CHOICES if desk.thumbs else CHOICES) or pair_id not in desk.queues.get(name, []):
            return refused(request, 400, "That is not one of your pairs or choices: reload the page.")
        if (pair_id, name) not in desk.log.active():  # a resent form labels once
            swapped = not desk.thumbs and shown_swapped(desk.seed, pair_id, name)
            pick = {"left": "B" if swapped else "A", "right": "A" if swapped else "B"}.get(choice, choice)
            desk.log.label(pair_id, name, pick, "human", swapped=swapped, reason=reason or None)  # fsynced before the reply
        return RedirectResponse("/label", status_code=303)

    async def undo(request: Request) -> Response:
        name, stop = annotator(request)
        if stop is not None:
            return stop
        if await read_form(request) is None:
            return refused(request, 403, "The form was refused (too large, or not from your page): reload the page.")
        undone = desk.log.undo_last(name)
        return RedirectResponse("/label?m=" + ("undone" if undone else "nothing"), status_code=303)

    async def admin(request: Request) -> Response:
        if (stop := limited(request)) is not None:
            return stop
        if (name := holder(request)) != ADMIN:
            return refused(request, 403 if name else 401, "This page is for the admin link.")
        return page("admin.html", **admin_view(desk))

    async def download(request: Request) -> Response:
        if (stop := limited(request)) is not None:
            return stop
        if (name := holder(request)) != ADMIN:
            return refused(request, 403 if name else 401, "This page is for the admin link.")
        records, _ = desk.records()
        body = "".join(json.dumps(record) + "\n" for record in records)
        return Response(body, media_type="application/jsonl", headers={"content-disposition": 'attachment; filename="prefs.jsonl"'})

    def asset(name: str, media_type: str) -> Any:
        async def serve(request: Request) -> Response:
            return Response(static[name], media_type=media_type)

        return serve

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    class SecurityHeaders:
        """Adds SECURITY_HEADERS to every response (a plain ASGI middleware)."""

        def __init__(self, app: Any):
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            async def send_with_headers(message: Any) -> None:
                if message["type"] == "http.response.start":
                    headers = MutableHeaders(scope=message)
                    for key, value in SECURITY_HEADERS.items():
                        headers[key] = value
                await send(message)

            await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)

    return Starlette(middleware=[Middleware(SecurityHeaders)], routes=[
        Route("/", enter), Route("/label", label_page), Route("/label", label_post, methods=["POST"]), Route("/undo", undo, methods=["POST"]),
        Route("/admin", admin), Route("/admin/prefs.jsonl", download), Route("/health", health),
        Route("/static/label.js", asset("label.js", "text/javascript")), Route("/static/style.css", asset("style.css", "text/css")),
    ])  # fmt: skip


def records_of(units: list[Pair] | list[Item], log: LabelLog, aggregate: str, ties: str, provenance: dict[str, Any]) -> Any:
    """prefs.jsonl as the labels stand at the moment of the call (pairs, or thumbs' unpaired examples)."""
    if units and isinstance(units[0], Item):
        return lambda: build_thumb_records(units, log.active_events(), aggregate, provenance)  # type: ignore[arg-type]
    return lambda: build_records(units, log.active_events(), aggregate, ties, provenance)  # type: ignore[arg-type]


def require_web() -> None:
    """The web extra, or one line saying how to get it (said before sampling, not after)."""
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn", "jinja2") if importlib.util.find_spec(name) is None]
    if missing:
        from dpo_cli.core.errors import UserError

        raise UserError(f"label.serve needs {', '.join(missing)}: pip install 'dpo-cli[web]'")


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(desk: Desk, host: str, port: int, say: Any) -> None:
    """Bind (port 0: any free one), print the links, and serve until Ctrl-C or SIGTERM; `say(line)` prints."""
    import signal
    import socket
    import threading

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # a link followed the moment it is printed finds the port open
    bound = sock.getsockname()[1]
    desk.cookie = f"{COOKIE}_{bound}"
    shown = f"[{host}]" if ":" in host else host
    if not is_loopback(host):
        say(f"warning: serving on {host}: anyone who can reach port {bound} can try the links; put it behind a reverse proxy with TLS")
    by_name = {name: token for token, name in desk.tokens.items()}
    for name in desk.queues:
        say(f"link for {name}: http://{shown}:{bound}/?token={by_name[name]}")
    say(f"admin link: http://{shown}:{bound}/?token={by_name[ADMIN]}")
    config = uvicorn.Config(build_app(desk), log_level="warning", access_log=False, timeout_keep_alive=5, server_header=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    # The server runs in a thread and this one waits for Ctrl-C or SIGTERM: uvicorn's own handlers would
    # raise the signal again once it has stopped, killing the process before the records are written.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread.start()
        while not stop.wait(0.5) and thread.is_alive():
            pass
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not stop.is_set() or thread.is_alive():
        from dpo_cli.core.errors import UserError

        raise UserError("the labelling server stopped by itself (see the lines above); every label given is in labels.jsonl: start it again")


def check_address(host: str, port: int) -> None:
    """One clear line, before sampling, when the server could not listen there."""
    import socket

    from dpo_cli.core.errors import UserError

    if not host:
        raise UserError("label.host is empty: give an address, e.g. 127.0.0.1 (or 0.0.0.0 for every interface, behind a TLS proxy)")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise UserError(f"label.host / label.port: cannot listen on {host}:{port} ({exc.strerror or exc}); pick another with --port (0: any free one) or --host") from None

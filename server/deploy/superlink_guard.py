"""The SuperLink's one open door: only the Fleet API answers other hosts.

Flower 1.41 serves every SuperLink API from ONE uvicorn server on one port (`--host/--port`):
the Fleet API (`/v1/fleet/...`, what SuperNodes use), the Control API (`/v1/control/...`,
`flwr run`, `flwr supernode register`), the Runtime API (`/v1/runtime/...`, what the ServerApp
and SuperExec use), `/v1/runtime/responses`, `/health`, and FastAPI's `/docs` and
`/openapi.json`. Its `--control-api-address` / `--fleet-api-address` flags are deprecated no-ops
for the HTTP APIs, so the others cannot be bound to loopback on their own; and its SuperExec
secret (`--superexec-auth-secret-file`) is ignored in the default subprocess isolation
("SuperExec auth secret is ignored in subprocess isolation mode"). The open-source Control API has
no login, and a Runtime task token is all the Runtime API asks for. So this ASGI middleware,
outermost, answers 403 to every path but `/v1/fleet/` from any address but loopback and the
SuperLink's own (its helpers dial the bound address). A remote `X-Forwarded-For` cannot fake
loopback: uvicorn trusts that header only from 127.0.0.1.

Why Flower stays at 1.41 (checked against the 1.42.0 wheel): 1.42 still builds the app's
middleware in the private `flwr.superlink.main._get_middleware`, now with an extension hook
(`flwr.superlink.extensions.get_middleware`) that only the separately distributed SuperGrid
Extensions package fills; it has no public option to keep the non-Fleet APIs to loopback either.
Moving would keep the same patch, so the pin stays, and `guarded_superlink` refuses to start
if the hook it patches is missing.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

OPEN_TO_ALL = ("/v1/fleet/",)  # the Fleet API: SuperNodes (they authenticate with their keys)
LOOPBACK = ("127.0.0.1", "::1", "localhost")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def allowed(path: str, client: str, local: set[str] | frozenset[str]) -> bool:
    """May `client` reach `path`? Fleet paths: anyone (authentication is Flower's); the rest:
    this machine only."""
    return client in local or any(path.startswith(p) for p in OPEN_TO_ALL)


class FleetOnlyForOthers:
    """A pure ASGI middleware (no request body buffering, streams pass through)."""

    BODY = json.dumps({"detail": "only the Fleet API answers other hosts; the Control and "
                                 "Runtime APIs answer the coordinator's own machine"}).encode()

    def __init__(self, app: Any, local: tuple[str, ...] = ()):
        self.app, self.local = app, frozenset((*LOOPBACK, *local))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") in ("http", "websocket"):
            client = (scope.get("client") or ("", 0))[0]
            if not allowed(str(scope.get("path", "")), str(client), self.local):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(self.BODY)).encode())]})
                await send({"type": "http.response.body", "body": self.BODY})
                return
        await self.app(scope, receive, send)


def install(own: tuple[str, ...] = ()) -> None:
    """Put the guard outermost in the SuperLink's middleware list (before `flower_superlink()`).

    Flower 1.41 builds the app's middleware from `flwr.superlink.main._get_middleware()`, a
    private hook: if it is gone, refuse to start rather than run unguarded."""
    from starlette.middleware import Middleware  # lazy: starlette loads only when this runs

    import flwr.superlink.main as superlink_main  # lazy: flwr loads only when this runs

    original = getattr(superlink_main, "_get_middleware", None)
    if original is None:
        raise SystemExit("chestfed: this Flower version has no flwr.superlink.main._get_middleware;"
                         " the SuperLink guard cannot be installed (Flower 1.41 expected)")
    superlink_main._get_middleware = lambda: [Middleware(FleetOnlyForOthers, local=own),
                                              *original()]

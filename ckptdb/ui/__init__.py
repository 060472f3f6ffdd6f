"""``ckptdb ui``: a local, read-only web view of a catalog (runs, checkpoints, retention plans, SQL).

Needs the ``ui`` extra (``pip install 'ckptdb[ui]'``: Starlette, Jinja2, uvicorn). The chart is
uPlot, shipped in ``static/vendor/`` (no CDN). See docs/ui.md.

Example:
    >>> from ckptdb.ui import serve
    >>> serve("sqlite:////data/ckpts/catalog.db", port=8765)  # doctest: +SKIP
"""

from __future__ import annotations

import ipaddress
import sys

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(url: str, *, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the catalog at ``url`` until interrupted (binds ``host``; warns when it is not loopback)."""
    import uvicorn

    from ckptdb.ui.app import create_app

    loopback = is_loopback(host)
    if not loopback:
        print(
            f"ckptdb ui: warning: listening on {host}, not a loopback address: anyone who can reach this"
            " machine can read the catalog (read-only, but names, paths and metadata are visible)",
            file=sys.stderr,
        )
    allowed = [*LOOPBACK_NAMES, f"[{host}]" if ":" in host else host] if loopback else None
    app = create_app(url, allowed_hosts=allowed)
    shown = f"[{host}]" if ":" in host else host
    print(f"ckptdb ui: serving {app.state.catalog.display_url} read-only at http://{shown}:{port}/", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["is_loopback", "serve"]

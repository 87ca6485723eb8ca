"""`raysys monitor`: a running endpoint's live drift and latency report."""

from __future__ import annotations

from typing import Annotated

import typer

from raysys.cli.common import console, fail


def monitor(url: Annotated[str, typer.Option(help="Endpoint base URL.")] = "http://127.0.0.1:8000",
            as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON report.")] = False):
    """Print the live drift and latency report of a running endpoint (sending its API key: $RAYSYS_API_TOKEN,
    the file $RAYSYS_API_TOKEN_FILE, or ~/.raysys/api_key, where `make demo` keeps it)."""
    import requests

    from raysys.workflow.traffic import format_report
    from serve.apikey import auth_headers

    try:
        headers = auth_headers()
    except ValueError as e:  # a named key file that is missing or empty
        raise fail(str(e)) from None
    try:
        r = requests.get(f"{url.rstrip('/')}/v1/monitor", headers=headers, timeout=10)
    except requests.RequestException as e:
        raise fail(f"--url: cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise fail(f"{url}/v1/monitor answered {r.status_code}: {r.text[:300]}", code=1)
    console.print_json(r.text) if as_json else console.print(format_report(r.json()), highlight=False)

"""`raysys monitor`: a running endpoint's live drift and latency report."""

from __future__ import annotations

from typing import Annotated

import typer

from raysys.cli.common import console, fail


def monitor(url: Annotated[str, typer.Option(help="Endpoint base URL.")] = "http://127.0.0.1:8000",
            as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON report.")] = False):
    """Print the live drift and latency report of a running endpoint."""
    import requests

    from raysys.workflow.traffic import format_report

    try:
        r = requests.get(f"{url.rstrip('/')}/v1/monitor", timeout=10)
    except requests.RequestException as e:
        raise fail(f"--url: cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise fail(f"{url}/v1/monitor answered {r.status_code}: {r.text[:300]}", code=1)
    console.print_json(r.text) if as_json else console.print(format_report(r.json()), highlight=False)

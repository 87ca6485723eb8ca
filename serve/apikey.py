"""The endpoint's API key, Ray-free: where the replicas read it, the start-up refusal of an endpoint that would
listen beyond loopback without one, the key an embedded local Ray generates, and where raysys's own clients
find it.

- Replicas: `RAYSYS_API_TOKEN`, else the first line of the file `RAYSYS_API_TOKEN_FILE` names (a mounted
  secret). With a key, every /v1/* route needs `Authorization: Bearer <key>` (or `X-API-Key: <key>`).
- Without a key, a replica refuses to start (ValueError) when its HTTP entry points reach beyond loopback
  (serve.host not 127.0.0.1/::1/localhost, or Serve's HAProxy / direct ingress, which bind all interfaces),
  unless `serve.network: private` says only trusted hosts can reach them.
- `raysys demo`, `raysys serve deploy` and `python -m raysys.jobs.pipeline` on an embedded local Ray, with no
  key set, use `~/.raysys/api_key` (made once: `secrets.token_urlsafe(32)`, mode 0600) and hand it to the
  local Ray's processes as `RAYSYS_API_TOKEN_FILE`.
- raysys's clients (the demo traffic, `raysys monitor`, the retrain job's labelled-traffic reader, the load
  benchmark) send `RAYSYS_API_TOKEN`, else the file `RAYSYS_API_TOKEN_FILE`, else `~/.raysys/api_key`.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

API_TOKEN_ENV = "RAYSYS_API_TOKEN"
API_TOKEN_FILE_ENV = "RAYSYS_API_TOKEN_FILE"
DEFAULT_KEY_FILE = Path("~/.raysys/api_key")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

log = logging.getLogger("ray.serve")


def read_key_file(path: str | Path, where: str = API_TOKEN_FILE_ENV) -> str:
    """The first line of a key file; ValueError naming `where` when it is missing or empty."""
    try:
        lines = Path(path).expanduser().read_text().strip().splitlines()
    except OSError as e:
        raise ValueError(f"{where}={path}: cannot read the API key file ({e.strerror})") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ValueError(f"{where}={path}: the API key file is empty")
    return token


def load_api_token(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The endpoint's API key: `explicit`, else $RAYSYS_API_TOKEN, else the first line of the file named by
    $RAYSYS_API_TOKEN_FILE (a mounted secret). None: no key. A named file that is missing or empty is an
    error (ValueError), never a silently open endpoint."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit
    if env.get(API_TOKEN_ENV):
        return env[API_TOKEN_ENV]
    path = env.get(API_TOKEN_FILE_ENV)
    return read_key_file(path) if path else None


def require_api_key(token: str | None, network: str, exposure: list[str]) -> None:
    """The start-up check of a replica: no key while `exposure` (why its HTTP entry points reach beyond
    loopback) is not empty is a ValueError naming the setting and the fix, unless serve.network is
    'private'."""
    if token or not exposure:
        return
    if network == "private":
        log.warning("raysys: no API key and serve.network=private: the endpoint is open to whoever reaches %s",
                    "; ".join(exposure))
        return
    raise ValueError(
        f"serve.network='{network}' and no API key, but this endpoint listens beyond loopback ({'; '.join(exposure)}): "
        f"anyone who reaches it could send predictions and feedback labels that steer retraining. Fix: set "
        f"{API_TOKEN_ENV} or {API_TOKEN_FILE_ENV} (a file holding the key, e.g. a mounted Secret) in the replicas' "
        f"environment (the environment of `ray start`, or the application's runtime_env env_vars); or, when only "
        f"trusted hosts can reach these ports, set serve.network: private (serve_cfg: {{network: private}})")


def ensure_api_key(path: str | Path | None = None, environ: dict[str, str] | None = None) -> tuple[Path | None, bool]:
    """For an embedded local Ray that will serve: when the environment names no key, use the key file at
    `path` (default ~/.raysys/api_key), generating it when missing (secrets.token_urlsafe(32), file mode
    0600 in a 0700 directory), and set RAYSYS_API_TOKEN_FILE to it in `environ` (os.environ) so the local
    Ray's processes read it. Returns (the key file, whether it was generated); (None, False) when
    RAYSYS_API_TOKEN or RAYSYS_API_TOKEN_FILE is already set (that key is used as it is)."""
    env = os.environ if environ is None else environ
    if env.get(API_TOKEN_ENV) or env.get(API_TOKEN_FILE_ENV):
        return None, False
    key_file = Path(path or DEFAULT_KEY_FILE).expanduser().resolve()
    created = False
    if not key_file.exists():
        key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL + 0600 at creation: the key is never readable by others, not even for an instant
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        created = True
    read_key_file(key_file, "api key file")  # an empty or unreadable file is an error now, not at the replicas
    if key_file.stat().st_mode & 0o077:
        log.warning("raysys: %s is readable by other users; chmod 600 it", key_file)
    env[API_TOKEN_FILE_ENV] = str(key_file)
    return key_file, created


def client_api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """The key raysys's own clients send: $RAYSYS_API_TOKEN, else the file $RAYSYS_API_TOKEN_FILE, else
    ~/.raysys/api_key when it exists (what `make demo` made). None: send none."""
    env = os.environ if environ is None else environ
    token = load_api_token(None, env)
    if token:
        return token
    default = DEFAULT_KEY_FILE.expanduser()
    return read_key_file(default, "api key file") if default.is_file() else None


def auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """{"Authorization": "Bearer <key>"} for `client_api_key()`, or {} when there is none."""
    token = client_api_key(environ)
    return {"Authorization": f"Bearer {token}"} if token else {}


def key_usage(key_file: Path | str, url: str) -> str:
    """How to use the key (for the CLI to print): where it is and a curl line that sends it."""
    return (f"API key: {key_file} (every /v1/* request needs it; rotate: write a new key there and restart "
            f"the endpoint)\n  curl -H \"Authorization: Bearer $(cat {key_file})\" {url}/v1/model")

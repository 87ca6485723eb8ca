"""The raysys Ray Serve application (`serve/app.py`) and its Serve config file (`serve/config.yaml`).

Import `serve.app` for `build_app` (the `serve run` / `serve deploy` import path `serve.app:build_app`) and
`deploy` (used by the pipeline and the `raysys serve` command). Importing this package alone does not
import Ray.
"""

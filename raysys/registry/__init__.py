"""A versioned model store on `pyarrow.fs`: a local directory by default, `s3://` or `gs://` on clusters.

Layout under the root::

    <root>/<name>/versions/<N>/model.safetensors    student weights (safetensors: loading runs no code)
                              /model.json           spec for raysys.models.build_model
                              /schema.json          DatasetSchema
                              /preprocessor.json    Preprocessor.to_dict()
                              /metrics.json  /config.json  /lineage.json
                              /reference_profile.json   (optional) monitor reference
                              /model_card.json  /model_card.md   (optional) the model card
                              /manifest.json        every other file with its sha256 and size
    <root>/<name>/aliases/<alias>.json              {"version": N, "history": [..., N], ...}

Modules: `store` (`Registry`: register, resolve, load), `aliases` (the alias files and their history),
`manifest` (what a version holds, sha256 checks), `files` (paths and bytes on pyarrow.fs, JSON helpers).
The registry imports only raysys.data and raysys.models: every Serve replica loads models through it.
"""

from raysys.registry.store import LoadedModel, Registry

__all__ = ["LoadedModel", "Registry"]

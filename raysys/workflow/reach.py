"""Does every node of the cluster reach the storage it was given? Checked before Ray's workers touch it.

On a multi-node cluster, Ray Train's workers write checkpoints under `run_dir`, Tune's trials write theirs,
Ray Data's read tasks open the Parquet under `data.root` and Serve replicas load models from the registry,
each on whatever node it was placed. A path that exists only on the head (a local disk instead of a shared
filesystem) fails there late and obscurely: a worker's "No such file or directory" deep inside a trial, or
a checkpoint that the driver never sees. This check fails early and says what to do: the driver writes a
marker file under each store (the dataset's `schema.json` stands in for one under a dataset root, which is
only read), and one zero-CPU task pinned to every alive node reads it back and, in a store, writes its own
probe beside it. A cluster whose only node is the driver's needs no check.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

log = logging.getLogger("raysys")

MARKER_PREFIX = ".raysys-reach-"
FIX = ("every node must reach it: a shared filesystem mounted at the same path on every node (NFS, EFS, "
       "Filestore, a KubeRay volume) or a pyarrow.fs URI (s3://, gs://, hdfs://); see README, 'Run on a cluster'")
_checked: set[tuple] = set()  # (path, node IDs) already seen to reach, in this process


def _fs(path: str):
    import os

    import pyarrow.fs as pafs

    if "://" not in path:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    return pafs.FileSystem.from_uri(path)


def _probe(path: str, name: str, digest: str, write: bool) -> str | None:
    """On one node: None when `path/name` reads back with the driver's sha256 `digest` (and, with `write`, a
    probe file can be written beside it), else what went wrong."""
    import hashlib

    import ray

    try:
        fs, root = _fs(path)
        target = f"{root.rstrip('/')}/{name}"
        with fs.open_input_stream(target) as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                return f"{target} differs from the driver's (another filesystem at the same path?)"
        if write:
            probe = f"{target}.{ray.get_runtime_context().get_node_id()[:12]}"
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
        return None
    except Exception as e:  # noqa: BLE001 - reported to the driver with the node it happened on
        return f"{type(e).__name__}: {e}"


def check_nodes_reach(stores: dict[str, str], data: dict[str, str] | None = None, *,
                      timeout_s: float = 120.0) -> None:
    """`stores`: {config field: path or URI} that workers write (a marker is written there and read back,
    a probe written beside it); `data`: {config field: dataset root} that workers only read (its
    `schema.json` is read back, nothing written). Raises ValueError naming the field, the node and the fix
    when a node cannot reach one."""
    import hashlib

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes: list[dict[str, Any]] = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    if all(n["NodeID"] == here for n in nodes):
        return
    ids = tuple(sorted(n["NodeID"] for n in nodes))
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    todo = [(f, p, True) for f, p in stores.items()] + [(f, p, False) for f, p in (data or {}).items()]
    for field, path, write in todo:
        if (path, ids) in _checked:
            continue
        fs, root = _fs(path)
        marker = None
        if write:
            token = uuid.uuid4().hex.encode()
            fs.create_dir(root, recursive=True)
            name = f"{MARKER_PREFIX}{token.decode()}"  # a file of its own: nothing left behind, no shared dir
            marker = f"{root.rstrip('/')}/{name}"
            with fs.open_output_stream(marker) as f:
                f.write(token)
        else:
            name = "schema.json"
            with fs.open_input_stream(f"{root.rstrip('/')}/{name}") as f:
                token = f.read()
        digest = hashlib.sha256(token).hexdigest()
        try:
            refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(path, name, digest, write) for n in nodes]
            errors = ray.get(refs, timeout=timeout_s)
        finally:
            if marker:
                fs.delete_file(marker)
        bad = [(n, err) for n, err in zip(nodes, errors) if err]
        if bad:
            n, err = bad[0]
            others = f" (and {len(bad) - 1} more node(s))" if len(bad) > 1 else ""
            raise ValueError(f"{field}: {path!r} is not reachable from node {n.get('NodeManagerAddress')} "
                             f"({n['NodeID'][:12]}){others}: {err}; {FIX}")
        _checked.add((path, ids))
        log.debug("raysys: %s %s reached from %d nodes", field, path, len(nodes))

"""The Ray job entrypoints, shipped with the package: `python -m raysys.jobs.<name>`, or through the repo's
`jobs/<name>.py` (`ray job submit --working-dir . -- python jobs/<name>.py ...`). Each parses its flags and
calls the library (`raysys.workflow`); the last line it prints is one JSON object."""

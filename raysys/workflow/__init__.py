"""The loop's steps over the library, shared by the `raysys` CLI and the job entrypoints (`raysys.jobs`):

- `cluster`: join a Ray cluster or start a local one;
- `stages`: data -> teacher (Ray Train) -> distillation (Ray Tune) -> registry, one function per stage;
- `reference`: the served model's monitor reference (profile and drift-detector calibration);
- `overrides`: command-line flags -> config overrides;
- `traffic`: the demo's client of the HTTP endpoint;
- `labelled_traffic`, `promotion`, `retrain`: retraining a served model on its recent labelled traffic.
"""

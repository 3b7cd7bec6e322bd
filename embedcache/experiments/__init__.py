"""Experiments: what users run on cached features and models, each one API call of the CLI.

- :mod:`~embedcache.experiments.protocol`: the probe protocol (sweep on val, refit, test once).
- :mod:`~embedcache.experiments.artifacts`: probe directories on disk and loading them back.
- :mod:`~embedcache.experiments.predict`: classifying new images with a saved probe.
- :mod:`~embedcache.experiments.bench`: leaderboards across backbones.
- :mod:`~embedcache.experiments.fewshot`: k-shot x seed learning curves.
- :mod:`~embedcache.experiments.reports`: JSON/CSV/Markdown reports and PNG plots.
- :mod:`~embedcache.experiments.demo`: the offline end-to-end demo.
- :mod:`~embedcache.experiments.finetune`: LP->FT fine-tuning of the network behind a probe.
"""

"""Extraction: an image source through a frozen backbone into a cache entry.

- :mod:`~embedcache.extraction.plan`: the frozen :class:`ExtractionPlan` (key, paths, backbone
  identity) resolved before any model runs.
- :mod:`~embedcache.extraction.loop`: the one inference loop (also used by ``predict`` and
  fine-tuning's evaluation), decoding in DataLoader workers.
- :mod:`~embedcache.extraction.extract`: :func:`extract`, plan -> resume/reuse -> loop -> entry.
"""

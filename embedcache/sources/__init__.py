"""Image sources: where the rows of a data set come from, and how one image is decoded.

- :mod:`~embedcache.sources.base`: :class:`Sample` (one row) and :class:`ImageSource` (the rows
  plus ``load_image``, and ``load_pixels``: what the model's preprocessing takes, gray images as
  mode ``L``), the manifest hash that identifies a data set in the cache key.
- :mod:`~embedcache.sources.files`: image folders and CSV manifests.
- :mod:`~embedcache.sources.arrays`: ``.npz`` arrays, the bundled demo, MNIST-family IDX files.
- :mod:`~embedcache.sources.torchvision`: other torchvision data set classes, from local files.
- :mod:`~embedcache.sources.decode`: the one safe decoder of encoded image files.
- :mod:`~embedcache.sources.materialize`: writing any source out as an image folder.
- :mod:`~embedcache.sources.open`: :func:`open_source`, one string to a source, splits assigned.

Nothing here knows about backbones or the cache; nothing is ever downloaded.
"""

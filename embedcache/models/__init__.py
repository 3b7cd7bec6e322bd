"""Backbones: a name becomes a frozen, truncated feature extractor with its preprocessing.

- :mod:`~embedcache.models.backbone`: the types (:class:`BackboneParts` a factory returns,
  :class:`Backbone` ready for extraction, :class:`BackboneInfo` for listings).
- :mod:`~embedcache.models.registry`: the registry (:func:`register_backbone`).
- :mod:`~embedcache.models.builtins`: the built-ins (``pixels``, EfficientNet-Lite, torchvision,
  timm), registered like plugins.
- :mod:`~embedcache.models.catalog`: name resolution, :func:`get_backbone`, :func:`list_backbones`.
- :mod:`~embedcache.models.truncate`, :mod:`~embedcache.models.pooling`: cutting the classifier
  or reading an intermediate node, pooled.
- :mod:`~embedcache.models.weights`: reading state dicts safely, hashing weights.
- :mod:`~embedcache.models.fuse`: folding BatchNorm for inference.
- :mod:`~embedcache.models.preprocess`: preprocessing as plain data, and applying it.
- :mod:`~embedcache.models.efficientnet_lite`, :mod:`~embedcache.models.lite_weights`: the
  offline pretrained default, EfficientNet-Lite, and its weights.
- :mod:`~embedcache.models.runtimes`: which inference runtime runs a backbone (torch, OpenVINO,
  ONNX Runtime); :mod:`~embedcache.models.exports`: exporting for them (torch);
  :mod:`~embedcache.models.export_cache`: the exports they share, cached once per configuration
  and found again without torch; :mod:`~embedcache.models.openvino_backbone`,
  :mod:`~embedcache.models.onnx_backbone`: each runtime's model of the export.
"""

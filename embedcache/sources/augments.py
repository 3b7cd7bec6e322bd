"""The ``--augment`` choices of ``extract --views`` (no heavy imports: the CLI's help reads them)."""

#: ``--augment`` choices: what one augmented view of an image is.
AUGMENTS = {
    "flip": "the mirror image (left-right); at most 2 views",
    "crop": "a random box of 35-100% of the area, aspect 3/4-4/3, then the usual resize and centre crop",
    "standard": "crop, then a left-right flip with probability 1/2",
}
#: The augmentation when ``--views`` is given without ``--augment``.
DEFAULT_AUGMENT = "standard"

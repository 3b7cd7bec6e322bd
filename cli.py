"""Shim so that `python cli.py ...` from a checkout behaves like `embedcache ...`."""
from embedcache.cli import main

main()

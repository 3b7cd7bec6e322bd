"""`python -m embedcache` entry point."""
from embedcache.cli import main

main()

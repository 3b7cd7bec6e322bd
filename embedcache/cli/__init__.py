"""The command-line interface: the only layer that prints or exits; every command is one API call.

:data:`main` is the click group (:mod:`embedcache.cli.main`); each module here defines the
commands of one family and they are added to the group below, so nothing imports the CLI back.
Command modules import the library inside the command functions: ``embedcache --help``, ``ls``,
``info`` and ``rm`` load neither torch nor scikit-learn.

Errors raised on purpose (EmbedcacheError) become a one-line message and exit code 1; click's own
usage errors exit with 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

from embedcache.cli import backbones, bench, cache, demo, extract, finetune, probe, verify
from embedcache.cli.main import main

for _command in (extract.extract_command, cache.ls_command, cache.info_command, cache.rm_command,
                 backbones.backbones_command, probe.probe_command, probe.predict_command, bench.bench_command,
                 bench.fewshot_command, demo.demo_command, finetune.finetune_command, verify.verify_command):
    main.add_command(_command)

__all__ = ["main"]

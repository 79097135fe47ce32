"""What every script shares: ``--config`` / ``--set`` arguments and one-line errors for user mistakes."""
from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable

from diffuseseg.config import Config, load_config
from diffuseseg.errors import UserError


def config_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml", metavar="PATH",
                        help="the YAML config (default: %(default)s); missing keys take the defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, typed like the existing one "
                             "(repeatable), e.g. --set train.max_steps=500 --set run.device=cpu")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file with the ``--set`` overrides; a diffusers backbone brings its own noise schedule."""
    cfg = load_config(args.config, args.overrides)
    if cfg.model.backbone == "diffusers":
        from diffuseseg.backbones import adopt_checkpoint_schedule
        cfg = adopt_checkpoint_schedule(cfg)
    return cfg


_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose an output folder on another disk; finished files "
                  "are complete, nothing half-written was left",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another output folder",
    errno.EACCES: "no permission: choose a folder you can write to",
    errno.EPERM: "no permission: choose a folder you can write to",
    errno.EROFS: "read-only file system: choose an output folder on a writable disk",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another output path",
    errno.EISDIR: "that path is a folder, a file was expected",
    errno.ENOENT: "no such file or folder",
}


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main: user mistakes print one line (no traceback) and exit 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # the file system said no: name the path and what to do, not a traceback
        where = f" at {err.filename}" if err.filename else ""
        print(f"error: file system error{where}: {err.strerror or err} ({_HINTS.get(err.errno, 'check the path')})",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

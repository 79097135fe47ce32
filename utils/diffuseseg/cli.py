"""What every script shares: ``--config`` / ``--set`` arguments and one-line errors for user mistakes."""
from __future__ import annotations

import argparse
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
    return load_config(args.config, args.overrides)


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main: user mistakes print one line (no traceback) and exit 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

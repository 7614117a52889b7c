"""The `blip2-hf` console script: parse the command line before the package's heavy imports.

`import blip2_hf` imports torch and transformers and registers the package's classes with transformers' Auto classes
(library code relies on that), which takes seconds. `blip2-hf --help` and argument errors need none of it: this
launcher creates the `blip2_hf` package module without running its `__init__`, imports `blip2_hf.cli` (which imports
only the standard library and `blip2_hf.constants` / `blip2_hf.demo` at the top) to parse the arguments, and then runs
the package's `__init__` in that same module object (the standard `importlib.util.module_from_spec` /
`loader.exec_module` pair, split in two) before the command runs. Library users see no difference: the package is
the same, fully initialised module by the time any command code touches it.

It lives outside the package because a console script names `module:function`, and importing any `blip2_hf.*`
module would run `blip2_hf/__init__` first.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

PACKAGE = "blip2_hf"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: `sys.argv[1:]`) with `blip2_hf.cli`'s parser, then initialise the package and run the
    command; returns its exit code. `--help` and usage errors exit inside the parsing (argparse's `SystemExit`)."""
    deferred = None
    if PACKAGE not in sys.modules:  # already imported (a library user calling this): nothing to defer
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(f"No module named {PACKAGE!r}", name=PACKAGE)
        deferred = importlib.util.module_from_spec(spec)  # `__path__` set: its submodules import; `__init__` not run
        sys.modules[PACKAGE] = deferred
    try:
        from blip2_hf import cli

        args = cli.parse_args(argv)
        if deferred is not None:
            deferred.__spec__.loader.exec_module(deferred)
            deferred = None
    finally:
        if deferred is not None:  # parsing ended (`--help`, a usage error): leave no half-made package behind
            for name in [name for name in sys.modules if name == PACKAGE or name.startswith(f"{PACKAGE}.")]:
                del sys.modules[name]
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())

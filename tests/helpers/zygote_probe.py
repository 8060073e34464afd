"""A child for tests/unit/test_zygote.py: echoes stdin lines to stdout until EOF, after a first line
that tells what it sees (argv, cwd, an environment variable, whether torch came preloaded, its
torch threads); with `--exit N` exits N after the echo, with `--sleep` waits to be signalled."""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    args = sys.argv[1:]
    seen = {
        "argv": args,
        "cwd": os.getcwd(),
        "probe_env": os.environ.get("ZYGOTE_PROBE"),
        "torch_preloaded": "torch" in sys.modules,
        "main_file": sys.modules["__main__"].__file__,
    }
    print(json.dumps(seen), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if "--sleep" in args:
        time.sleep(600)
    for line in sys.stdin:
        print(line.rstrip("\n").upper(), flush=True)
    return int(args[args.index("--exit") + 1]) if "--exit" in args else 0


if __name__ == "__main__":
    sys.exit(main())

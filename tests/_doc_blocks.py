"""Run docs pages' python blocks one after another in this process, each as a whole program.

    python tests/_doc_blocks.py BLOCKS.json  →  prints one JSON list: per block, what it printed
    and the traceback if it raised.

Each block gets a fresh ``__main__`` namespace (no block sees another's names), and 64-bit mode
is switched back off after each (blocks turn it on with ``jax.config.update``). What a block
changes beyond that (environment variables, XLA flags, devices) outlives it, so such blocks run
in a process of their own (``tests/test_readme.py`` decides which).
"""

import contextlib
import io
import json
import sys
import traceback


def run(blocks: list[str]) -> list[dict]:
    out = []
    for i, block in enumerate(blocks):
        stdout, error = io.StringIO(), None
        with contextlib.redirect_stdout(stdout):
            try:
                exec(compile(block, f"<docs block {i}>", "exec"), {"__name__": "__main__"})  # noqa: S102 - our docs
            except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
                error = traceback.format_exc()
        if "jax" in sys.modules:
            sys.modules["jax"].config.update("jax_enable_x64", False)
        out.append({"stdout": stdout.getvalue(), "error": error})
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        results = run(json.load(f))
    print(json.dumps(results))

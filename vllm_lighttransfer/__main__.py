"""``python -m vllm_lighttransfer ...`` is the ``lighttransfer`` command."""

import sys

from vllm_lighttransfer.cli import main

if __name__ == "__main__":
    sys.exit(main())

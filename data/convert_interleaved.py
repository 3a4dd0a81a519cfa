#!/usr/bin/env python
"""Convert interleaved image–text documents into document shards.

`python data/convert_interleaved.py …` is `python -m vlm.cli.convert_interleaved …`:
the code and its argparse flags live in vlm/cli/convert_interleaved.py (`--help` lists them).
Needs the package installed (`pip install -e .`).
"""

import sys

from vlm.cli.convert_interleaved import main

if __name__ == "__main__":
    sys.exit(main())

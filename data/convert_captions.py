#!/usr/bin/env python
"""Convert image–caption pairs into chat shards.

`python data/convert_captions.py …` is `python -m vlm.cli.convert_captions …`:
the code and its argparse flags live in vlm/cli/convert_captions.py (`--help` lists them).
Needs the package installed (`pip install -e .`).
"""

import sys

from vlm.cli.convert_captions import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert LLaVA / ShareGPT conversations into chat shards.

`python data/convert_llava.py …` is `python -m vlm.cli.convert_llava …`:
the code and its argparse flags live in vlm/cli/convert_llava.py (`--help` lists them).
Needs the package installed (`pip install -e .`).
"""

import sys

from vlm.cli.convert_llava import main

if __name__ == "__main__":
    sys.exit(main())

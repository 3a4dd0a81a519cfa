#!/usr/bin/env python
"""Convert Parquet files / Arrow `save_to_disk` folders of conversations + images into chat shards.

`python data/convert_parquet.py …` is `python -m vlm.cli.convert_parquet …`:
the code and its argparse flags live in vlm/cli/convert_parquet.py (`--help` lists them).
Needs the package installed with the parquet extra (`pip install -e '.[parquet]'`).
"""

import sys

from vlm.cli.convert_parquet import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Make the synthvqa benchmark (shards + tokenizer + dataset.json).

`python data/make_synthetic.py …` is `python -m vlm.cli.make_synthetic …`:
the code and its argparse flags live in vlm/cli/make_synthetic.py (`--help` lists them).
Needs the package installed (`pip install -e .`).
"""

from vlm.cli.make_synthetic import main

if __name__ == "__main__":
    main()

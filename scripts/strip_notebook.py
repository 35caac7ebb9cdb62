"""Strip volatile metadata from executed notebooks: ``python scripts/strip_notebook.py IN.ipynb [OUT.ipynb]``.

Writes OUT (default: IN, in place) with papermill's timestamps and durations removed and execution counts
renumbered, outputs and images kept (see ``nclib.report.strip_notebook``).
"""
import json
import sys
from pathlib import Path

from nclib.report import strip_notebook


def main(argv):
    if len(argv) not in (1, 2):
        sys.exit(__doc__)
    src = Path(argv[0])
    dst = Path(argv[1]) if len(argv) == 2 else src
    nb = strip_notebook(json.loads(src.read_text()))
    dst.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])

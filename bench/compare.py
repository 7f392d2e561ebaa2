"""The softmax-vs-linear attention comparison; same as `python -m ds_linclip.experiments.compare`.

    python bench/compare.py --help
    python bench/compare.py --steps 200 --image-sizes 28 56 [--scale]

See ds_linclip/experiments/compare.py for what is measured and how.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_linclip.experiments.compare import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

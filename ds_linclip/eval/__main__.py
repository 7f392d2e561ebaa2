"""`python -m ds_linclip.eval --checkpoint PATH | --watch RUN_DIR [--config YAML] [key=value ...]`"""

import sys

from ds_linclip.eval.job import main

if __name__ == "__main__":
    sys.exit(main())

import os
import sys

from bench.errors import ConfigError
from bench.run.validate import assignments, check_launcher, refuse_unsafe_overrides

if __name__ == "__main__":
    try:
        refuse_unsafe_overrides(sys.argv[1:])  # before Hydra creates a folder named after them
        check_launcher(sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if ("hydra/launcher", "parallel") in assignments(sys.argv[1:]):  # jobs share one terminal: bars would interleave
        os.environ.setdefault("TQDM_DISABLE", "1")
    from bench.run.cli import main

    main()

import sys

from bench.errors import ConfigError
from bench.validate import refuse_unsafe_overrides

if __name__ == "__main__":
    try:
        refuse_unsafe_overrides(sys.argv[1:])  # before Hydra creates a folder named after them
    except ConfigError as err:
        sys.exit(f"error: {err}")
    from bench.cli import main

    main()

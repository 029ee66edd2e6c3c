"""``python -m moetrain.plan``."""

from moetrain.cli import skip_exit_collection
from moetrain.plan.cli import main

if __name__ == "__main__":
    skip_exit_collection()
    main()

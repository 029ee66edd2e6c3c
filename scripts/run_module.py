"""``python scripts/run_module.py MODULE [ARGS...]`` runs MODULE the way ``python -m MODULE ARGS...`` does.

For launchers that can only start a file: DeepSpeed's Slurm runner (``deepspeed --launcher slurm``)
builds ``srun ... python -u <user_script> <args>`` and drops ``--module``, so scripts/train_multinode.sh
passes this file with the module name as its first argument. As with ``-m``, the current directory
(not this file's directory) leads sys.path, ``sys.argv[0]`` is the module's file and the module runs as
``__main__``.
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: run_module.py MODULE [ARGS...]")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]  # runpy replaces argv[0] with the module's path
    sys.path[0] = os.getcwd()  # `python -m` puts the working directory first, not this script's folder
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

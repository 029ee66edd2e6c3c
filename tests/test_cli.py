"""moetrain.cli: what every ``python -m moetrain.<command>`` process does alike."""

from __future__ import annotations

import subprocess
import sys

# Registered before skip_exit_collection, so it runs after it (atexit is last in, first out): it sees
# the state the interpreter shuts down in. A file written in an atexit hook must still reach the disk.
_SCRIPT = """
import atexit, gc, sys
def report():
    print("frozen", gc.get_freeze_count() > 0)
    open(sys.argv[1], "w").write("written at exit")
atexit.register(report)
from moetrain.cli import skip_exit_collection
{call}
"""


def _exit_state(tmp_path, call: str) -> tuple[str, str]:
    out = tmp_path / "at_exit.txt"
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(call=call), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), out.read_text()


def test_exit_skips_the_final_collection_and_still_runs_exit_hooks(tmp_path):
    assert _exit_state(tmp_path, "skip_exit_collection()") == ("frozen True", "written at exit")
    assert _exit_state(tmp_path, "") == ("frozen False", "written at exit")  # the control: nothing frozen


def test_every_command_skips_the_final_collection():
    from pathlib import Path

    import moetrain

    root = Path(moetrain.__file__).parent
    for command in ("train", "export", "generate", "analyze", "plan"):
        entry = root / f"{command}.py"
        if not entry.is_file():  # a package: its __main__.py
            entry = root / command / "__main__.py"
        main_block = entry.read_text().split('if __name__ == "__main__":')[1]
        assert "skip_exit_collection()" in main_block, f"python -m moetrain.{command} does not skip it"

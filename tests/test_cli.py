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
        # run_then_exit skips all of finalization, the final collection included
        skips = "skip_exit_collection()" in main_block or "run_then_exit(" in main_block
        assert skips, f"python -m moetrain.{command} does not skip it"
    train = (root / "train.py").read_text().split('if __name__ == "__main__":')[1]
    assert "run_then_exit(main)" in train  # gloo's threads must not see the interpreter finalize


_EXIT_SCRIPT = """
import atexit, sys, threading, time
from moetrain.cli import run_then_exit

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

KEEP = Finalized()  # alive at exit: a normal exit frees it during finalization, run_then_exit does not
atexit.register(lambda: print("atexit hook", flush=True))

def late():
    time.sleep(0.3)
    print("non-daemon thread done", flush=True)

def main():
    threading.Thread(target=late).start()
    print("unflushed", end="")
    {body}

{call}
"""


def _run_exit(body: str, call: str = "run_then_exit(main)") -> subprocess.CompletedProcess:
    script = _EXIT_SCRIPT.format(body=body, call=call)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_run_then_exit_keeps_exit_codes_threads_and_hooks_but_not_finalization():
    ok = _run_exit("return 0")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["unflushednon-daemon thread done", "atexit hook"]
    failed = _run_exit("sys.exit(3)")
    assert failed.returncode == 3 and "atexit hook" in failed.stdout
    message = _run_exit("sys.exit('error: no')")
    assert message.returncode == 1 and message.stderr.strip() == "error: no"
    # The control: the same program ended by the interpreter finalizes the object kept alive.
    normal = _run_exit("return 0", call="main()")
    assert normal.returncode == 0 and normal.stdout.splitlines()[-1] == "finalized"

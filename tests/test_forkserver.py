"""tests/forkserver.py: a forked ``python -m dtp_search`` is a process of its own, with
the command line, working folder, environment, descriptors, exit status and signal
deaths of a new interpreter's."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import forkserver
import pytest


def test_a_bad_command_line_exits_2_with_its_message_on_stderr(tmp_path):
    done = forkserver.run(
        [f"paths.root={tmp_path / 'runs'}", "model=foo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: model='foo' is not a known model; allowed: ")
    assert done.stdout == ""
    assert not (tmp_path / "runs").exists()  # nothing written before the check


def test_the_child_has_its_own_folder_environment_and_session(tmp_path):
    """A user's network module found through PYTHONPATH and the working folder, an
    environment variable read by it, and a new session when asked for."""
    (tmp_path / "probe_net.py").write_text(
        "import os\n"
        "from torch import nn\n"
        "def build(num_classes):\n"
        "    with open(os.environ['PROBE_OUT'], 'w') as f:\n"
        "        f.write(f'{os.getcwd()} {os.getpid()} {os.getsid(0)}')\n"
        "    raise SystemExit(7)\n"
    )
    out = tmp_path / "probe.txt"
    proc = forkserver.popen(
        [
            f"paths.root={tmp_path / 'runs'}",
            "model=custom",
            "model._target_=probe_net.build",
            "console.progress=false",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PROBE_OUT=str(out)),
        start_new_session=True,
    )
    output, _ = proc.communicate(timeout=120)
    cwd, pid, sid = out.read_text().split()
    assert cwd == str(tmp_path) and int(pid) == proc.pid == int(sid), output
    assert proc.returncode == 7, output


def test_a_killed_child_reports_the_signal_as_popen_does(tmp_path):
    proc = forkserver.popen(
        [f"paths.root={tmp_path / 'runs'}", "train.epochs=100000", "console.progress=false"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert proc.poll() is None
    for timeout in (0, 0.2):
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert proc.poll() == -signal.SIGKILL


def test_a_missing_working_folder_raises_in_the_caller_as_popen_does(tmp_path):
    with pytest.raises(FileNotFoundError):
        forkserver.popen(["console.progress=false"], cwd=tmp_path / "nowhere")

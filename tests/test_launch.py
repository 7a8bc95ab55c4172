"""The test launcher (tests/launch.py) starts commands as a fresh interpreter would run them."""
import json
import multiprocessing
import os
import subprocess
import sys

from tests.launch import start_ranks


def _report(out: str) -> None:
    """Writes this process's start method and the parent of one of its DataLoader workers."""
    import torch.utils.data as tud

    class ParentOfWorker(tud.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return os.getppid()

    (parent,) = list(tud.DataLoader(ParentOfWorker(), num_workers=1, batch_size=None))
    with open(out, "w") as f:
        json.dump({"pid": os.getpid(), "start_method": multiprocessing.get_start_method(), "worker_parent": int(parent)}, f)


def test_a_command_process_owns_its_loader_workers_as_a_fresh_interpreter_does(tmp_path):
    """A command's DataLoader workers are its own children (so they exit when it is killed), by
    the start method a fresh interpreter has, not the fork server's."""
    fresh = subprocess.run([sys.executable, "-c", "import multiprocessing; print(multiprocessing.get_start_method())"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    out = tmp_path / "report.json"
    start_ranks(_report, (str(out),)).check()
    report = json.loads(out.read_text())
    assert report["start_method"] == fresh
    assert report["worker_parent"] == report["pid"]

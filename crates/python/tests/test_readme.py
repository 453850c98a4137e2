"""README's two-process Python example does what README says."""
import pathlib
import re
import subprocess

from conftest import finish, interrupt, python_child, wait_for_socket

README = pathlib.Path(__file__).resolve().parents[3] / "README.md"


def python_blocks():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    receiver = next(b for b in blocks if b.startswith("# receiver.py"))
    sender = next(b for b in blocks if b.startswith("# sender.py"))
    return receiver, sender


def test_the_readme_receiver_and_sender_work_as_written(socket_path):
    receiver_code, sender_code = (
        block.replace('"/tmp/frames.sock"', repr(socket_path)) for block in python_blocks()
    )
    receiver = python_child(receiver_code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_socket(socket_path, receiver)
    sender = python_child(sender_code + "\nprint(transfer_id)\n", stdout=subprocess.PIPE, text=True)
    assert finish(sender) == 0
    assert sender.stdout.read() == "1\n"
    line = receiver.stdout.readline().split()
    assert line[0] == "1" and line[1].startswith("Peer(pid=")
    assert abs(float(line[-1])) < 0.01  # the mean of 16 Mi standard normal samples
    interrupt(receiver)
    finish(receiver)
    assert "KeyboardInterrupt" in receiver.stderr.read()

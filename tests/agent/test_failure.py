"""Failure messages from the traceback in a run's log, and reading that log without following links."""

import os

from labrun.agent._failure import describe_traceback, failure_message

TRACEBACK = """epoch 1
Traceback (most recent call last):
  File "train.py", line 3, in <module>
    main()
    ^^^^^^
  File "train.py", line 2, in main
    raise ValueError("bad alpha: -1")
ValueError: bad alpha: -1
"""


def test_the_last_exception_is_named():
    assert describe_traceback(TRACEBACK) == "User program failed with ValueError: bad alpha: -1"
    chained = TRACEBACK + "\nDuring handling of the above exception, another exception occurred:\n\n" + \
        TRACEBACK.replace("ValueError: bad alpha: -1", "mypkg.errors.DataError: no rows\n  second line")
    assert describe_traceback(chained) == "User program failed with mypkg.errors.DataError: no rows\n  second line"
    assert describe_traceback("Traceback (most recent call last):\n  File 'x'\nKeyboardInterrupt\n") == \
        "User program failed with KeyboardInterrupt"
    assert describe_traceback("exited badly\n") is None
    assert len(describe_traceback(TRACEBACK.replace("-1\n", "x" * 5000 + "\n"))) == 1000


def test_reads_only_regular_files_without_following_links(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text(TRACEBACK.replace("bad alpha", "the secret"))
    os.symlink(secret, run_dir / "logs" / "std_log.txt")
    assert failure_message(run_dir) is None
    (run_dir / "logs" / "std_log_process_1.txt").write_text(TRACEBACK)
    assert failure_message(run_dir) == "User program failed with ValueError: bad alpha: -1"
    os.rename(run_dir / "logs", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", run_dir / "logs")
    assert failure_message(run_dir) is None

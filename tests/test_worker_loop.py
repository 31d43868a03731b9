"""The worker (tuner/engine/worker.py) before its first trial: its timeout counts from its start,
set-up included, and the note on a pack setting it cannot honour is one sentence."""

from __future__ import annotations

import os
import subprocess
import sys

from sweeps import study_file, trials

SLOW_MODEL = '''
import os
import time

from torch import nn

time.sleep(float(os.environ.get("SLOW_IMPORT", "0")))  # a model module that is slow to import


def build(num_classes, in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))
'''


def test_the_timeout_counts_from_the_start_and_the_pack_note_is_said_once(tmp_path):
    from tuner.engine.sweep import prepare_study
    from tuner.study.config import load_study_file

    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a model by file reference resolves against the working directory
    try:
        path = study_file(tmp_path, name="slow", model="slow_model.py:build", dataset="synthetic:200", epochs=1,
                          n_trials=4)
        prepare_study(load_study_file(path), url, None)
    finally:
        os.chdir(cwd)
    # the worker's set-up (importing the model) takes 3 s, longer than its 2 s timeout: it must
    # lease nothing (a clock started after the set-up would leave it 2 s of trials)
    env = {**os.environ, "TUNER_STORAGE": url, "SLOW_IMPORT": "3", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "tuner", "worker", "--study-name", "slow", "--timeout", "2",
                          "--pack", "4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert trials(url, "slow") == []
    assert "worker done: 0 trials" in run.stdout
    notes = [line for line in run.stderr.splitlines() if line.startswith("note: pack 4")]
    assert len(notes) == 1 and notes[0].count("one at a time") == 1, run.stderr
    assert "model by reference" in notes[0]

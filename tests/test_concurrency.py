"""Renders never share a mutable image: concurrent renders of one original give the bytes a render alone gives.

Pillow's ``save()`` keeps its settings on the image object, so two renders encoding one shared image (a kept
intermediate) used to take each other's quality. Checked on real render threads: the gevent thread pool that
production uses (in a monkey-patched subprocess), and a plain thread pool.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.imaging import DEFAULT_CONFIG
from tests.support import REPO

REPETITIONS = 25


@pytest.mark.parametrize("mode", ["--gevent", "--threads"])
def test_concurrent_renders_equal_renders_alone(mode: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tests.render_race", mode, "--repetitions", str(REPETITIONS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{mode}: {result['compared']} concurrent renders compared, {result['differed']} differed")
    # Every original x every preset x every output form, every repetition.
    assert result["compared"] == REPETITIONS * result["originals"] * len(DEFAULT_CONFIG.presets) * result["forms"]
    assert result["originals"] >= 6 and result["forms"] == 8 and result["failed_alone"] == 0
    assert result["differed"] == 0, result["examples"]

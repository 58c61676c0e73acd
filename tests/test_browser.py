"""End-to-end test of the browser demo page with headless Chromium and the real server.

Both run inside a fresh network namespace holding only loopback (``unshare
--net``), so the test can reach nothing else: tests/browser_check.py starts the
server there and drives the page (a bad upload's error, session start, video
playing, microphone speech, sliders, say, audio-file speech, Interrupt, Stop).
Skipped only when Chromium or unshare is missing.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHECK_SCRIPT = Path(__file__).resolve().parent / "browser_check.py"
SPEECH_FILE = Path("/work/shared/data/speech/librivox_0870.wav")
# The checks take about 15 s on 2 cores; the margin is for a loaded machine. The
# script's own watchdog (200 s) prints where it hangs before this kills it.
CHECK_TIMEOUT_S = 240


def _text(output: bytes | str | None) -> str:
    # TimeoutExpired carries bytes even when the run asked for text.
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _namespace_command(inner: list[str]) -> list[str]:
    """``inner`` run in a new network namespace whose only interface, loopback, is up.
    Without root, a user namespace maps us to root inside so ``ip`` may set lo up."""
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--net"]
    return [*unshare, "bash", "-c", f"ip link set lo up && exec {shlex.join(inner)}"]


@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"Chromium is not installed at {CHROMIUM} (make system-deps)")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
def test_demo_page_end_to_end(browser_mic_wav: Path, browser_artifact_dir: Path) -> None:
    screenshot = browser_artifact_dir / "browser.png"
    screenshot.unlink(missing_ok=True)
    command = _namespace_command([
        sys.executable, "-u", str(CHECK_SCRIPT),
        "--mic-wav", str(browser_mic_wav),
        "--speech-file", str(SPEECH_FILE),
        "--artifacts", str(browser_artifact_dir),
    ])
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
                                cwd=CHECK_SCRIPT.parent.parent)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the browser check ran over {CHECK_TIMEOUT_S} s; it got this far:\n{_text(exc.stdout)}\n"
                    f"stderr (last 8000 chars):\n{_text(exc.stderr)[-8000:]}")
    report = (f"stdout:\n{result.stdout}\nstderr (last 8000 chars):\n{result.stderr[-8000:]}\n"
              f"server log: {browser_artifact_dir / 'browser-server.log'}")
    assert result.returncode == 0, report
    assert "all browser checks passed" in result.stdout, report
    assert screenshot.is_file() and screenshot.stat().st_size > 0, report

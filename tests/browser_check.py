"""End-to-end check of the browser demo: the real server and headless Chromium.

Run by ``tests/test_browser.py`` inside a fresh network namespace that holds
only loopback (``unshare --net``), so nothing here can reach another machine.
It serves the app with uvicorn in a thread of this process (in-process store,
ICE host candidates pinned to 127.0.0.1, a free port), drives the page at ``/``
with Playwright and Debian's Chromium (flags per
/work/shared/notes/webrtc-testing.md; the fake microphone plays ``--mic-wav``),
and checks, in order:

1. a text file as portrait gets the server's error shown in words, and no session;
2. a session starts: the video element plays (videoWidth > 0) and decoded
   frames increase (the element's count and the page's getStats figure);
3. the microphone's speech makes the avatar speak (a ``state: speaking`` event);
4. moving the sliders reaches the server (the live session's motion changes);
5. muting the microphone lets the avatar return to idle;
6. ``say`` makes it speak and return to idle (or, without espeak-ng, shows
   the ``tts_unavailable`` error);
7. an uploaded audio file makes it speak; Interrupt cuts it
   (``playback_finished`` with ``interrupted: true``, then ``idle``) and the
   video keeps playing;
8. Stop ends the session on the server.

Screenshots go to ``<artifacts>/browser.png`` (the page after the interrupt),
``browser-speaking.png`` (the video while it speaks the file) and
``browser-failure.png`` when a check fails, and the server log to ``<artifacts>/browser-server.log``.
Exit status 0 when every check passed, 1 otherwise (the reason on stdout,
every thread's stack on stderr).
JavaScript page errors and console errors fail the run, except the one
console error the bad-upload check causes on purpose.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import ConsoleMessage, Page, sync_playwright

from model.base import MotionSettings
from server.app import create_app
from server.config import Settings

CHROMIUM = "/usr/bin/chromium"
# Waits are generous: two CPU cores run the generator, the VP8 encoder and Chromium at once.
STEP_TIMEOUT_MS = 45_000


class CheckFailed(AssertionError):
    """A check of the page failed; the message says which and what was seen."""


def chromium_args(mic_wav: Path) -> list[str]:
    """Flags for headless Chromium with WebRTC on loopback and a WAV file as the microphone."""
    return [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic_wav}",
    ]


class ServerThread:
    """The app served by uvicorn in a background thread on 127.0.0.1 at a free
    port (``url``). The listening socket exists before the thread starts, so a
    request made at once waits in the backlog instead of failing."""

    def __init__(self, log_path: Path) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        # Only these variables: a REDIS_URL or API key in the caller's environment must not leak in.
        settings = Settings.from_env({"AVATAR_ICE_HOST_ADDRESSES": "127.0.0.1", "AVATAR_PORT": str(port)})
        self.app = create_app(settings)
        handler = logging.FileHandler(log_path, mode="w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in ("server", "avatar", "model", "uvicorn"):
            logging.getLogger(name).addHandler(handler)
            # server at DEBUG: the microphone's turn detection logs there.
            logging.getLogger(name).setLevel(logging.DEBUG if name == "server" else logging.INFO)
        # log_config=None: uvicorn's own dictConfig would close the handler above. The
        # event loop is uvicorn's default ("auto": uvloop when installed), as avatar-server's.
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="uvicorn", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Shut the server down (ending every session) and wait for it."""
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

    @property
    def manager(self):
        """The SessionManager (exists once the app's lifespan has started)."""
        return self.app.state.server.manager


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = STEP_TIMEOUT_MS / 1000) -> None:
    """Poll a server-side ``condition`` (the server runs in this process) until
    true; raise CheckFailed naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


class DemoPageCheck:
    """Drives the demo page through a session; each method is one check."""

    def __init__(self, page: Page, server: ServerThread, speech_file: Path, artifacts: Path) -> None:
        self.page = page
        self.server = server
        self.speech_file = speech_file
        self.artifacts = artifacts
        # Console errors the current check causes on purpose (substrings); others fail the run.
        self.expected_console: tuple[str, ...] = ()
        self.unexpected_console: list[str] = []
        self.page_errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        expected = any(part in message.text for part in self.expected_console)
        print(f"console error{' (expected)' if expected else ''}: {message.text}")
        if not expected:
            self.unexpected_console.append(message.text)

    def wait_js(self, expression: str, what: str, arg: object = None) -> object:
        """Wait until the JS function ``expression`` (called with ``arg``) returns truthy; its value."""
        try:
            handle = self.page.wait_for_function(expression, arg=arg, timeout=STEP_TIMEOUT_MS)
        except PlaywrightError as exc:
            raise CheckFailed(f"timed out waiting for {what}: {exc.message.splitlines()[0]}") from None
        return handle.json_value()

    def event_mark(self) -> int:
        """Sequence number the next server event received by the page will have."""
        return self.page.evaluate("() => window.avatarDemo.nextSeq")

    def wait_event(self, after: int, what: str, predicate_js: str) -> dict:
        """Wait for a server event with seq >= ``after`` matching ``predicate_js`` (JS, of ``e``)."""
        return self.wait_js(
            f"(after) => window.avatarDemo.events.find((e) => e.seq >= after && ({predicate_js}))",
            what, after,
        )

    def decoded_frames(self) -> int:
        return self.page.evaluate("() => document.querySelector('[data-testid=video]')"
                                  ".getVideoPlaybackQuality().totalVideoFrames")

    def bad_portrait_error_is_shown(self) -> None:
        page = self.page
        page.goto(self.server.url + "/")
        # The browser itself logs the refused upload as a failed resource load.
        self.expected_console = ("status of 422",)
        page.get_by_test_id("portrait-upload").check()
        page.get_by_test_id("portrait-file").set_input_files(
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture"})
        page.get_by_test_id("start").click()
        message = self.wait_js(
            "() => { const m = document.querySelector('[data-testid=message]');"
            " return !m.hidden && m.textContent; }",
            "an error message for a portrait that is not an image",
        )
        self.wait_js("() => !document.querySelector('[data-testid=start]').disabled", "Start to be enabled again")
        if len(self.server.manager):
            raise CheckFailed("a session was started although the portrait upload failed")
        page.get_by_test_id("portrait-bundled").check()
        self.expected_console = ()
        print(f"ok: a text file as portrait -> message {message!r}")

    def wait_frames(self, count: int, what: str) -> int:
        """Wait until the video element has decoded ``count`` more frames; its total."""
        return self.wait_js(
            "(n) => { const t = document.querySelector('[data-testid=video]')"
            ".getVideoPlaybackQuality().totalVideoFrames; return t >= n && t; }",
            what, self.decoded_frames() + count,
        )

    def start_session_with_mic(self) -> None:
        page = self.page
        page.get_by_test_id("mic").check()
        mark = self.event_mark()
        page.get_by_test_id("start").click()
        size = self.wait_js(
            "() => { const v = document.querySelector('[data-testid=video]');"
            " return v.videoWidth > 0 && !v.paused && [v.videoWidth, v.videoHeight]; }",
            "the video to play",
        )
        before = self.decoded_frames()
        after = self.wait_frames(10, "decoded frames to increase")
        stats_frames = self.wait_js(
            "() => { const n = Number(document.querySelector('[data-testid=stat-decoded]').textContent);"
            " return n > 0 && n; }",
            "the page's getStats framesDecoded",
        )
        first = self.wait_event(mark, "the first state event", "e.type === 'state'")
        print(f"ok: video plays {size[0]}x{size[1]}; frames {before} -> {after}; getStats framesDecoded "
              f"{stats_frames}; first state {first['state']}")

    def mic_makes_it_speak(self) -> None:
        speaking = self.wait_event(0, "the microphone's speech to make the avatar speak",
                                   "e.type === 'state' && e.state === 'speaking'")
        started = self.wait_event(0, "playback_started", "e.type === 'playback_started'")
        print(f"ok: microphone speech -> speaking (page time {speaking['at']:.0f} ms, pts {started['pts']})")

    def sliders_reach_server(self) -> None:
        page = self.page
        session_id = page.evaluate("() => window.avatarDemo.sessionId")
        live = self.server.manager.get(session_id)
        if live is None:
            raise CheckFailed(f"the page's session {session_id!r} is not live on the server")
        # Keyboard on the sliders, as a user without a mouse would: End = 1, Home = 0.
        page.get_by_test_id("face").press("End")
        page.get_by_test_id("body").press("Home")
        wanted = MotionSettings(face=1.0, body=0.0)
        wait_until(lambda: live.motion == wanted, f"the server session's motion to become {wanted}")
        print(f"ok: sliders -> server motion {live.motion}")

    def mute_mic_goes_idle(self) -> None:
        self.page.get_by_test_id("mic").uncheck()
        # The latest state, not any idle since the mark: the clip's pauses give idles too.
        self.wait_js(
            "() => { const s = window.avatarDemo.events.filter((e) => e.type === 'state');"
            " return s[s.length - 1].state === 'idle'; }",
            "idle after muting the microphone",
        )
        print("ok: microphone muted -> idle")

    def microphone_utterances(self) -> int:
        """Utterances the server's voice detector has started on the page's microphone."""
        live = self.server.manager.get(self.page.evaluate("() => window.avatarDemo.sessionId"))
        return live.peer.stats()["microphone_utterances"]

    def say_text(self) -> None:
        """With espeak-ng the avatar speaks the text and returns to idle by itself;
        without it the page shows the server's ``tts_unavailable`` error."""
        page = self.page
        mic_utterances = self.microphone_utterances()
        page.get_by_test_id("say-text").fill("Hello there. I am a talking portrait.")
        mark = self.event_mark()
        page.get_by_test_id("say").click()
        if shutil.which("espeak-ng") is None:
            self.wait_event(mark, "the tts_unavailable error", "e.type === 'error' && e.code === 'tts_unavailable'")
            self.wait_js("() => !document.querySelector('[data-testid=message]').hidden", "the error to be shown")
            print("ok: say without espeak-ng -> tts_unavailable shown")
            return
        self.wait_event(mark, "say to make the avatar speak", "e.type === 'state' && e.state === 'speaking'")
        finished = self.wait_event(mark, "the said text to finish", "e.type === 'playback_finished'")
        if finished["interrupted"]:
            raise CheckFailed(f"the said text was cut: {finished}")
        self.wait_event(mark, "idle after the said text", "e.type === 'state' && e.state === 'idle'")
        # The mic clip's pauses (its loop gap included) last at most 1 s: unmuted, it would have spoken again by now.
        if self.microphone_utterances() != mic_utterances:
            raise CheckFailed("the muted microphone still started utterances on the server")
        print(f"ok: say -> speaking, finished after {finished['position']:.2f} s -> idle; muted microphone silent")

    def file_speech_then_interrupt(self) -> None:
        page = self.page
        page.get_by_test_id("audio-file").set_input_files(self.speech_file)
        mark = self.event_mark()
        page.get_by_test_id("speak-file").click()
        self.wait_event(mark, "the audio file to make the avatar speak",
                        "e.type === 'state' && e.state === 'speaking'")
        # Half a second of frames in, so the picture shows speech, not the frame before it.
        self.wait_frames(12, "speaking frames to arrive")
        page.get_by_test_id("video").screenshot(path=str(self.artifacts / "browser-speaking.png"))
        mark = self.event_mark()
        clicked_at = page.evaluate("() => performance.now()")
        page.get_by_test_id("interrupt").click()
        finished = self.wait_event(mark, "playback_finished after Interrupt", "e.type === 'playback_finished'")
        if not finished["interrupted"]:
            raise CheckFailed(f"Interrupt during speech answered {finished}, not interrupted: true")
        idle = self.wait_event(mark, "idle after Interrupt", "e.type === 'state' && e.state === 'idle'")
        self.wait_js("() => document.querySelector('[data-testid=state]').dataset.state === 'idle'",
                     "the page to show idle")
        self.wait_frames(10, "the video to keep playing after the interrupt")
        print(f"ok: file speech -> speaking; Interrupt -> playback_finished at {finished['position']:.2f} s "
              f"(interrupted), idle event {idle['at'] - clicked_at:.0f} ms after the click; video goes on")

    def run(self) -> list[str]:
        """Every check in order (stopping at the first that fails), screenshots
        to ``artifacts``; returns the failures, JavaScript and console errors included."""
        failures = []
        try:
            self.bad_portrait_error_is_shown()
            self.start_session_with_mic()
            self.mic_makes_it_speak()
            self.sliders_reach_server()
            self.mute_mic_goes_idle()
            self.say_text()
            self.file_speech_then_interrupt()
            self.screenshot(self.artifacts / "browser.png")
            self.stop_ends_session()
        except CheckFailed as exc:
            faulthandler.dump_traceback(all_threads=True)
            self.screenshot(self.artifacts / "browser-failure.png")
            shown = self.page.evaluate("() => document.querySelector('[data-testid=message]').textContent")
            events = self.page.evaluate("() => window.avatarDemo.events.filter((e) => e.type !== 'stats')")
            failures.append(f"{exc}\npage message: {shown!r}\nserver events the page got (stats left out):\n"
                            + "\n".join(map(str, events)))
        failures += [f"JavaScript error on the page: {text}" for text in self.page_errors]
        failures += [f"error in the browser console: {text}" for text in self.unexpected_console]
        return failures

    def screenshot(self, path: Path) -> None:
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")

    def stop_ends_session(self) -> None:
        session_id = self.page.evaluate("() => window.avatarDemo.sessionId")
        self.page.get_by_test_id("stop").click()
        wait_until(lambda: self.server.manager.get(session_id) is None, "Stop to end the session on the server")
        print("ok: Stop ended the session on the server")


def run_checks(args: argparse.Namespace) -> int:
    """Serve the app, run every check in Chromium; 0 when all passed, else 1."""
    artifacts: Path = args.artifacts
    artifacts.mkdir(parents=True, exist_ok=True)
    server = ServerThread(artifacts / "browser-server.log")
    server.start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=chromium_args(args.mic_wav))
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                failures = DemoPageCheck(page, server, args.speech_file, artifacts).run()
            finally:
                browser.close()
    finally:
        server.stop()
    for failure in failures:
        print(f"FAIL: {failure}")  # stdout, after the progress lines; thread stacks went to stderr
    if failures:
        return 1
    print("all browser checks passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mic-wav", type=Path, required=True, help="16-bit PCM WAV the fake microphone plays")
    parser.add_argument("--speech-file", type=Path, required=True, help="audio file uploaded as speech")
    parser.add_argument("--artifacts", type=Path, required=True, help="directory for the screenshot and server log")
    parser.add_argument("--watchdog-s", type=float, default=200.0,
                        help="after this many seconds, print every thread's stack and exit (a hang)")
    args = parser.parse_args(argv)
    faulthandler.dump_traceback_later(args.watchdog_s, exit=True)
    status = run_checks(args)
    if status:
        # A failed run may leave a generator thread stuck (that may be the very
        # failure, its stack is printed above); exiting normally would wait for it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())

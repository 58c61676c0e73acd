"""``avatar-eval``: the built-in lip-sync quality measure of a rendered video (see avatar.lipsync).

    avatar-eval VIDEO --audio AUDIO [--phones PHONES.json] [--plot OUT.png] [--json] [--strict]

Prints lag, correlation, open/closed ratio and silence jitter with PASS/FAIL per
target. Exit 0 when measured (1 with --strict and a failed target), 2 on bad input.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from avatar.audio_file import AudioFileError, load_audio, to_mono_16k
from avatar.cli_common import OneLineParser, configure_logging, run_cli
from avatar.lipsync import (
    BILABIALS,
    OPEN_VOWELS,
    LipSyncInputError,
    LipSyncReport,
    Phone,
    evaluate,
    load_phones,
    measure_video,
)

PROG = "avatar-eval"


def build_parser() -> OneLineParser:
    """The command-line interface of ``avatar-eval``."""
    parser = OneLineParser(prog=PROG, description="Measure lip sync of a talking-portrait video against its speech.")
    parser.add_argument("video", type=Path, help="rendered video (e.g. from avatar-render)")
    parser.add_argument("--audio", type=Path, required=True, help="the speech the video was rendered from")
    parser.add_argument("--phones", type=Path, help="phone alignment JSON (nested w lists of t/b/d entries)")
    parser.add_argument("--plot", type=Path, help="write a PNG of aperture and envelope over time here")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress notes and native library logs")
    return parser


def report_dict(report: LipSyncReport) -> dict:
    """The figures as a JSON-able dict; non-finite or missing figures become None."""

    def finite(value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) else None

    return {
        "lag_ms": finite(report.lag_ms),
        "correlation": finite(report.correlation),
        "open_closed_ratio": finite(report.ratio) if report.ratio != math.inf else None,
        "open_closed_ratio_infinite": report.ratio == math.inf,
        "silence_jitter": finite(report.jitter),
        "frames": report.frames,
        "missing_faces": report.missing_faces,
        "fps": report.fps,
        "targets": {name: passed for name, passed in report.targets()},
        "passed": report.passed(),
    }


def format_report(report: LipSyncReport) -> str:
    """Human-readable lines: figures, then one PASS/FAIL/n/a line per target."""

    def show(value: float | None, spec: str) -> str:
        return "n/a" if value is None or math.isnan(value) else format(value, spec)

    lines = [
        f"frames             {report.frames} at {report.fps:g} fps ({report.missing_faces} without a face, interpolated)",
        f"lag                {show(report.lag_ms, '+.1f')} ms (positive: video late)",
        f"correlation        {show(report.correlation, '.3f')}",
        f"open/closed ratio  {show(report.ratio, '.2f')}",
        f"silence jitter     {show(report.jitter, '.4f')} (std of aperture change per frame)",
    ]
    for name, passed in report.targets():
        verdict = "n/a" if passed is None else ("PASS" if passed else "FAIL")
        lines.append(f"{verdict:4}  {name}")
    return "\n".join(lines)


def write_plot(
    path: Path, aperture: np.ndarray, envelope: np.ndarray, fps: float, phones: list[Phone] | None
) -> None:
    """PNG of aperture and envelope over time (each on its own y axis), with open
    vowels and bilabials shaded and labelled when phones are given. ``aperture``
    and ``envelope``: float (n,) per video frame at ``fps``. Creates the file's
    directory if missing; raises OSError when the file cannot be written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    times = np.arange(len(aperture)) / fps
    figure, left = plt.subplots(figsize=(max(8.0, times[-1] * 1.6), 4.0), dpi=100, layout="constrained")
    right = left.twinx()
    left.plot(times, aperture, color="tab:blue", label="mouth aperture (video)")
    right.plot(times, envelope, color="tab:orange", alpha=0.8, label="speech envelope (audio)")
    left.set_xlabel("time (s)")
    left.set_ylabel("mouth aperture", color="tab:blue")
    right.set_ylabel("speech envelope", color="tab:orange")
    end = len(aperture) / fps
    for phone in phones or []:
        # Marks past the video's end would stretch the layout beyond the axes.
        if phone.begin < end and (phone.label in OPEN_VOWELS or phone.label in BILABIALS):
            colour = "tab:green" if phone.label in OPEN_VOWELS else "tab:red"
            left.axvspan(phone.begin, min(phone.end, end), color=colour, alpha=0.15, linewidth=0)
            left.text(
                (phone.begin + min(phone.end, end)) / 2, 1.0, phone.label, transform=left.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=7, color=colour,
            )
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    if phones:
        handles += [
            plt.Rectangle((0, 0), 1, 1, color="tab:green", alpha=0.3, label="open vowel"),
            plt.Rectangle((0, 0), 1, 1, color="tab:red", alpha=0.3, label="bilabial"),
        ]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    left.set_xlim(0, end)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)


def _measure(args) -> int:
    phones = load_phones(args.phones) if args.phones is not None else None
    samples, rate = load_audio(args.audio)
    video = measure_video(args.video)
    report, envelope = evaluate(video.aperture, video.missing, to_mono_16k(samples, rate), video.fps, phones)
    if args.plot is not None:
        write_plot(args.plot, video.aperture, envelope, video.fps, phones)
    print(json.dumps(report_dict(report)) if args.json else format_report(report))
    return 1 if args.strict and not report.passed() else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``avatar-eval``; returns the exit status (see module docstring)."""
    args = build_parser().parse_args(argv)
    configure_logging(PROG, args.verbose)
    return run_cli(PROG, lambda: _measure(args), (AudioFileError, LipSyncInputError, OSError), args.verbose)


if __name__ == "__main__":
    sys.exit(main())

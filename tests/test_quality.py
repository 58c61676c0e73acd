"""The lip-sync measure (avatar.lipsync) and its CLI avatar-eval (avatar.quality)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from avatar.lipsync import (
    LipSyncInputError,
    Phone,
    best_lag,
    evaluate,
    frame_labels,
    load_phones,
    measure_video,
    open_closed_ratio,
    silence_jitter,
    speech_envelope,
)
from model.base import AUDIO_SAMPLE_RATE, frame_start_sample
from model.face_mesh import detect_faces, mouth_aperture

FPS = 25.0
OVERSAMPLE = 100  # fine time steps per frame for building shifted series


def smooth_series(seed: int, frames: int) -> np.ndarray:
    """A smooth random signal sampled OVERSAMPLE times per frame (mouth-like: ~60 ms correlation)."""
    noise = np.random.default_rng(seed).standard_normal((frames + 40) * OVERSAMPLE)
    return gaussian_filter1d(noise, sigma=0.06 * FPS * OVERSAMPLE)


@pytest.mark.parametrize("shift_s", [0.0, 0.052, -0.092, 0.13, 0.017])
def test_best_lag_recovers_a_subframe_shift(shift_s):
    fine = smooth_series(seed=abs(round(shift_s * 1000)), frames=200)
    frame_index = (np.arange(200) + 20) * OVERSAMPLE
    envelope = fine[frame_index]
    aperture = 3.0 * fine[frame_index - round(shift_s * FPS * OVERSAMPLE)] + 1.0  # video late by shift_s
    fit = best_lag(aperture, envelope, FPS)
    assert fit.lag_s == pytest.approx(shift_s, abs=0.004)  # a tenth of a frame
    assert fit.correlation > 0.95


def test_best_lag_correlation_is_low_for_unrelated_series():
    aperture = smooth_series(seed=1, frames=300)[::OVERSAMPLE][:300]
    envelope = smooth_series(seed=2, frames=300)[::OVERSAMPLE][:300]
    assert abs(best_lag(aperture, envelope, FPS).correlation) < 0.4


def test_best_lag_correlation_matches_noise_level():
    # aperture = signal + independent noise of equal variance: expected r = 1/sqrt(2).
    rng = np.random.default_rng(3)
    signal = rng.standard_normal(4000)
    aperture = signal + rng.standard_normal(4000)
    assert best_lag(aperture, signal, FPS).correlation == pytest.approx(1 / math.sqrt(2), abs=0.03)


def test_best_lag_of_constant_aperture_is_undefined():
    fit = best_lag(np.ones(50), np.arange(50.0), FPS)
    assert math.isnan(fit.lag_s) and math.isnan(fit.correlation)


def test_best_lag_rejects_different_lengths():
    with pytest.raises(ValueError, match="lengths differ"):
        best_lag(np.ones(10), np.ones(11), FPS)


def test_speech_envelope_follows_amplitude():
    seconds = np.arange(int(0.8 * AUDIO_SAMPLE_RATE)) / AUDIO_SAMPLE_RATE
    audio = np.where(seconds >= 0.4, 0.5 * np.sin(2 * np.pi * 220 * seconds), 0.0).astype(np.float32)
    envelope = speech_envelope(audio, num_frames=25, fps=FPS)  # 20 frames of audio, 5 past its end
    assert envelope.shape == (25,) and envelope.dtype == np.float32
    assert np.all(envelope[:8] < 0.02)  # silence, away from the onset
    assert envelope[12:19] == pytest.approx(0.5, abs=0.02)  # a sine's analytic magnitude is its amplitude
    assert np.all(envelope[20:] == 0)


def frames_of(label_per_frame: list[str]) -> list[Phone]:
    """Phones covering whole frames at FPS, one per frame."""
    return [
        Phone(label, frame_start_sample(k, FPS) / AUDIO_SAMPLE_RATE, frame_start_sample(k + 1, FPS) / AUDIO_SAMPLE_RATE)
        for k, label in enumerate(label_per_frame)
    ]


def test_frame_labels_use_the_frame_centre():
    phones = [Phone("SIL", 0.0, 0.05), Phone("AA", 0.05, 0.13)]  # frame 1 spans 0.04-0.08, centre 0.06
    assert frame_labels(phones, 5, FPS) == ["SIL", "AA", "AA", None, None]


def test_open_closed_ratio_from_phone_list():
    labels = ["SIL", "M", "AA", "AE", "P", "S", "AY", "B"]
    aperture = np.array([0.0, 0.02, 0.10, 0.14, 0.04, 0.5, 0.12, 0.02])
    phones = frames_of(labels)
    ratio = open_closed_ratio(aperture, frame_labels(phones, len(labels), FPS))
    assert ratio == pytest.approx(np.mean([0.10, 0.14, 0.12]) / np.mean([0.02, 0.04, 0.02]))


def test_open_closed_ratio_needs_both_groups():
    assert open_closed_ratio(np.ones(3), ["AA", "AA", "S"]) is None
    assert open_closed_ratio(np.array([0.1, 0.0]), ["AA", "M"]) == math.inf


def test_silence_jitter_counts_only_silent_neighbours():
    aperture = np.array([0.05, 0.06, 0.05, 0.06, 0.05, 0.9, 0.1, 0.7])
    silent = np.array([True, True, True, True, True, False, False, False])
    # differences inside the silence alternate +-0.01: std 0.01; the loud part is ignored.
    assert silence_jitter(aperture, silent) == pytest.approx(0.01)
    assert silence_jitter(aperture, np.zeros(8, bool)) is None


def test_load_phones_strips_stress_and_flattens(tmp_path, cli_phones_path):
    phones = load_phones(cli_phones_path)
    assert [p.label for p in phones[:4]] == ["SIL", "HH", "IY", "W"]
    assert all(a.begin <= b.begin for a, b in zip(phones, phones[1:]))
    nested = {"t": "x", "b": 0, "d": 1, "w": [{"t": "w", "b": 0, "d": 1, "w": [{"t": "AA1", "b": 0.1, "d": 0.2}]}]}
    path = tmp_path / "stress.json"
    path.write_text(json.dumps(nested))
    assert load_phones(path) == [Phone("AA", 0.1, pytest.approx(0.3))]


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"w": [{"t": "AA", "b": 0.1}]}), "every phone needs"),
        (json.dumps({"w": [{"t": "AA", "b": "x", "d": 0.1}]}), "every phone needs"),
        (json.dumps([1, 2]), "expected objects"),
    ],
)
def test_load_phones_rejects_malformed_files(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(LipSyncInputError, match=problem):
        load_phones(path)


def test_evaluate_without_phones_finds_silence_from_the_envelope():
    seconds = np.arange(AUDIO_SAMPLE_RATE) / AUDIO_SAMPLE_RATE
    audio = np.where(seconds >= 0.5, np.sin(2 * np.pi * 200 * seconds), 0.0).astype(np.float32)
    aperture = np.where(np.arange(25) < 12, 0.05 + 0.01 * (np.arange(25) % 2), 0.1)  # jittery only in silence
    report, envelope = evaluate(aperture, np.zeros(25, bool), audio, FPS)
    assert envelope.shape == (25,)
    assert report.jitter == pytest.approx(0.01, rel=0.02)  # +-0.01 steps; odd count, so mean not quite 0
    assert report.ratio is None


def test_measure_video_finds_the_face_and_interpolates_missing_frames(cli_still_video):
    path, image, black = cli_still_video
    measured = measure_video(path)
    assert measured.fps == FPS
    assert measured.aperture.shape == (75,)
    assert list(np.flatnonzero(measured.missing)) == list(black)
    still = mouth_aperture(detect_faces(image)[0])
    assert np.all(np.abs(measured.aperture - still) < 0.03)  # H.264 and tracking noise
    left, right = measured.aperture[black[0] - 1], measured.aperture[black[-1] + 1]
    assert min(left, right) - 1e-6 <= measured.aperture[black[0]] <= max(left, right) + 1e-6


def test_measure_video_rejects_non_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_bytes(b"this is not a video\n" * 10)
    with pytest.raises(LipSyncInputError, match="cannot decode video"):
        measure_video(path)


def test_eval_cli_prints_json_and_writes_a_png(tmp_path, cli_run, cli_still_video, cli_speech_path, cli_phones_path):
    plot = tmp_path / "quality.png"
    result = cli_run("avatar.quality", cli_still_video[0], "--audio", cli_speech_path,
                     "--phones", cli_phones_path, "--plot", plot, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["frames"] == 75 and figures["missing_faces"] == 2
    assert set(figures["targets"]) == {"lag within +-40 ms", "correlation >= 0.6", "open/closed ratio >= 3"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_strict_fails_a_still_face(cli_run, cli_still_video, cli_speech_path, cli_phones_path):
    # A still face opens as wide in vowels as in bilabials: ratio about 1, below the target of 3.
    result = cli_run("avatar.quality", cli_still_video[0], "--audio", cli_speech_path,
                     "--phones", cli_phones_path, "--strict")
    assert result.returncode == 1, result.stderr
    assert "FAIL  open/closed ratio" in result.stdout


@pytest.mark.parametrize("case", ["missing video", "not a video", "audio unreadable", "phones malformed"])
def test_eval_cli_bad_input_is_one_line(tmp_path, cli_run, cli_still_video, cli_speech_path, cli_phones_path, case):
    text = tmp_path / "text.txt"
    text.write_text("hello\n")
    video, audio, phones, expected = cli_still_video[0], cli_speech_path, cli_phones_path, ""
    if case == "missing video":
        video, expected = tmp_path / "absent.mp4", "video file not found"
    elif case == "not a video":
        video, expected = text, "cannot decode video"
    elif case == "audio unreadable":
        audio, expected = text, "cannot decode audio"
    else:
        phones, expected = text, "not valid JSON"
    result = cli_run("avatar.quality", video, "--audio", audio, "--phones", phones)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avatar-eval: error:") and expected in lines[0]

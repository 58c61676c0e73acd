"""Pushed-audio conversion (format checks, streaming resampling) and per-frame voice activity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from avatar.audio_in import AudioFormatError, AudioInput, VoiceActivity, validate_chunk
from avatar.frames import AudioChunk
from model.base import frame_start_sample

PHONES = Path("/work/shared/data/speech/librivox_0870.phone.json")


def convert_in_chunks(samples: np.ndarray, rate: int, sizes: list[int]) -> np.ndarray:
    """Feed ``samples`` through one AudioInput in chunks of ``sizes``, then flush."""
    audio_in = AudioInput()
    parts, start = [], 0
    for size in sizes:
        parts.append(audio_in.convert(AudioChunk(samples[start:start + size], rate)))
        start += size
    assert start == samples.shape[0]
    parts.append(audio_in.flush())
    return np.concatenate(parts)


def random_sizes(total: int, largest: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(min(rng.integers(1, largest + 1), total - sum(sizes))))
    return sizes


@pytest.mark.parametrize(
    ("samples", "rate", "wrong"),
    [
        (np.zeros(100, np.int16), 4000, "sample rate"),
        (np.zeros(100, np.int16), 96000, "sample rate"),
        (np.zeros(100, np.int16), 16000.0, "sample rate"),
        (np.zeros((100, 3), np.int16), 16000, "channels"),
        (np.zeros((2, 100), np.float32), 16000, "channels"),
        (np.zeros((10, 1, 1), np.float32), 16000, "shape"),
        (np.zeros(100, np.float64), 16000, "float64"),
        (np.zeros(100, np.int32), 16000, "int32"),
        (np.array([0.0, np.nan], np.float32), 16000, "NaN"),
        (np.array([0.0, np.inf], np.float32), 16000, "infinity"),
        ([0, 1, 2], 16000, "numpy array"),
    ],
)
def test_bad_audio_is_rejected_with_a_clear_message(samples, rate, wrong):
    with pytest.raises(AudioFormatError, match=wrong) as caught:
        AudioInput().convert(AudioChunk(samples, rate))
    message = str(caught.value)
    assert "\n" not in message
    assert any(word in message for word in ("accepted", "must", "["))


def test_a_non_chunk_is_rejected():
    with pytest.raises(AudioFormatError, match="AudioChunk"):
        validate_chunk(np.zeros(10, np.int16))


def test_16khz_mono_passes_through_unchanged(engine_speech):
    pcm = engine_speech[:16000]
    as_float = pcm.astype(np.float32) / 32768.0
    assert np.array_equal(convert_in_chunks(pcm, 16000, random_sizes(16000, 900, 1)), as_float)
    assert np.array_equal(convert_in_chunks(as_float, 16000, random_sizes(16000, 900, 2)), as_float)


def test_stereo_is_averaged_to_mono():
    rng = np.random.default_rng(3)
    stereo = rng.uniform(-1, 1, (4000, 2)).astype(np.float32)
    out = convert_in_chunks(stereo, 16000, [4000])
    assert np.allclose(out, stereo.mean(axis=1), atol=1e-6)
    loud = np.ones((100, 2), np.float32)  # both channels full scale: stays within [-1, 1]
    assert convert_in_chunks(loud, 16000, [100]).max() <= 1.0


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_length_frequency_and_level(rate):
    seconds, tone = 2, 440.0
    t = np.arange(seconds * rate) / rate
    samples = (0.5 * np.sin(2 * np.pi * tone * t)).astype(np.float32)
    out = convert_in_chunks(samples, rate, random_sizes(samples.shape[0], rate // 10, rate))
    assert out.shape == (seconds * 16000,)
    steady = out[1600:-1600]
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(steady.shape[0])))
    peak_hz = np.argmax(spectrum) * 16000 / steady.shape[0]
    assert abs(peak_hz - tone) < 2.0
    assert abs(np.sqrt(np.mean(steady**2)) - 0.5 / np.sqrt(2)) < 0.005


@pytest.mark.parametrize(("rate", "dtype", "channels"), [(44100, np.int16, 2), (24000, np.float32, 1)])
def test_chunked_conversion_equals_one_shot(rate, dtype, channels):
    rng = np.random.default_rng(rate)
    n = rate * 2
    samples = rng.integers(-8000, 8000, (n, channels)).astype(dtype)
    if dtype == np.float32:
        samples = samples / np.float32(32768.0)
    samples = samples[:, 0] if channels == 1 else samples
    one_shot = convert_in_chunks(samples, rate, [n])
    chunked = convert_in_chunks(samples, rate, random_sizes(n, 3000, 7))
    assert one_shot.shape == (32000,)
    assert np.array_equal(chunked, one_shot)


def test_format_change_mid_stream_restarts_without_losing_samples(engine_speech):
    first = engine_speech[:8000]
    second = np.zeros(48000, np.float32)
    audio_in = AudioInput()
    out = np.concatenate(
        [
            audio_in.convert(AudioChunk(first, 16000)),
            audio_in.convert(AudioChunk(second, 48000)),
            audio_in.flush(),
        ]
    )
    assert out.shape == (8000 + 16000,)
    assert np.array_equal(out[:8000], first / np.float32(32768.0))


def test_reset_drops_held_samples():
    audio_in = AudioInput()
    held = audio_in.convert(AudioChunk(np.ones(4800, np.float32) * 0.1, 48000))
    assert held.shape[0] < 1600  # the resampler keeps a few samples back
    audio_in.reset()
    assert audio_in.flush().shape == (0,)


def phone_spans(labels: set[str]) -> list[tuple[float, float]]:
    def walk(node):
        if "w" in node:
            for child in node["w"]:
                yield from walk(child)
        else:
            yield node

    root = json.loads(PHONES.read_text())
    return [(p["b"], p["b"] + p["d"]) for p in walk(root) if p["t"] in labels]


@pytest.mark.parametrize("fps", [25.0, 23.0])
def test_voice_activity_follows_the_phone_alignment(engine_speech, fps):
    vowels = phone_spans({"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "UW"})
    pauses = [(b, e) for b, e in phone_spans({"SIL"}) if e - b >= 0.2]
    assert pauses, "the clip has long pauses"
    audio = engine_speech.astype(np.float32) / 32768.0
    vad = VoiceActivity()
    in_vowel, in_pause = [], []
    for n in range(int(audio.shape[0] / 16000 * fps)):
        start, stop = frame_start_sample(n, fps), frame_start_sample(n + 1, fps)
        speech = vad.is_speech(audio[start:stop])
        begin, end = start / 16000, stop / 16000
        if any(b <= begin and end <= e for b, e in vowels):
            in_vowel.append(speech)
        if any(b <= begin and end <= e for b, e in pauses) and begin > 0.1:  # the VAD adapts over the first frames
            in_pause.append(speech)
    assert np.mean(in_vowel) >= 0.9
    assert np.mean(in_pause) <= 0.25


def test_voice_activity_on_silence_and_short_slices():
    vad = VoiceActivity()
    assert not vad.is_speech(np.zeros(640, np.float32))
    assert not vad.is_speech(np.zeros(100, np.float32))


def test_voice_activity_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode"):
        VoiceActivity(mode=4)
    with pytest.raises(ValueError, match="min_voiced"):
        VoiceActivity(min_voiced=0.0)

"""avatar-render end to end (subprocess, as users run it), its bad inputs, and audio file loading."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile
from scipy.signal import correlate, resample_poly

from avatar.audio_file import AudioFileError, load_audio, to_mono_16k

FPS = 25


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Write float samples in [-1, 1], shape (n,) or (n, channels), as PCM16 WAV."""
    wavfile.write(path, rate, (np.clip(samples, -1, 1) * 32767).astype(np.int16))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, cli_speech_path, cli_portrait_path) -> dict[str, Path]:
    """Good and bad input files, generated once for the module."""
    folder = tmp_path_factory.mktemp("cli_inputs")
    speech, rate = load_audio(cli_speech_path)
    assert rate == 16_000
    clip = speech[: int(1.2 * rate), 0]  # 1.2 s: "he was not"
    files = {
        "clip16k": write_wav(folder / "clip16k.wav", clip, 16_000),
        "clip8k": write_wav(folder / "clip8k.wav", resample_poly(clip, 1, 2), 8_000),
        "clip48k": write_wav(folder / "clip48k.wav", resample_poly(clip, 3, 1), 48_000),
        "stereo": write_wav(folder / "stereo.wav", np.stack([clip, 0.5 * clip], axis=1), 16_000),
        "silent": write_wav(folder / "silent.wav", np.zeros(16_000), 16_000),
        "empty": write_wav(folder / "empty.wav", np.zeros(0), 16_000),
        "text": folder / "notes.txt",
        "corrupt": folder / "corrupt.png",
        "tiny": folder / "tiny.png",
        "gradient": folder / "gradient.png",
        "huge": folder / "huge.jpg",
    }
    files["text"].write_text("this is not audio\n" * 20)
    files["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    Image.fromarray(np.full((100, 300, 3), 128, np.uint8)).save(files["tiny"])
    ramp = np.linspace(0, 255, 256).astype(np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (256, 1))] * 3, axis=2)).save(files["gradient"])
    with Image.open(cli_portrait_path) as portrait:
        portrait.convert("RGB").resize((2048, 2048)).save(files["huge"], quality=90)
    return files


def decoded_frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, cli_run, cli_portrait_path, cli_speech_path):
    """The shared 2.99 s clip rendered with the shared portrait at the default size."""
    out = tmp_path_factory.mktemp("cli_render") / "talk.mp4"
    result = cli_run("avatar.render", "--portrait", cli_portrait_path, "--audio", cli_speech_path, "-o", out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_render_writes_h264_video_with_aac_audio(rendered):
    out, result = rendered
    assert "Traceback" not in result.stderr
    expected_frames = math.ceil(2.99 * FPS)
    assert str(out) in result.stdout and f"{expected_frames} frames" in result.stdout
    with av.open(str(out)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        assert (video.width, video.height) == (512, 512)
        video_s = float(video.duration * video.time_base)
        audio_s = float(audio.duration * audio.time_base)
    assert abs(decoded_frame_count(out) - expected_frames) <= 1
    assert abs(audio_s - video_s) <= 1 / FPS


def test_rendered_audio_is_the_speech_without_offset(rendered, cli_speech_path):
    out, _ = rendered
    source = to_mono_16k(*load_audio(cli_speech_path))
    written = to_mono_16k(*load_audio(out))[: source.size]
    lag = int(np.argmax(correlate(written, source, mode="full"))) - (source.size - 1)
    assert abs(lag) <= 16  # 1 ms
    assert np.corrcoef(written, source)[0, 1] > 0.95  # AAC keeps the waveform


def test_rendered_video_meets_the_lipsync_targets(rendered, cli_run, cli_speech_path, cli_phones_path):
    out, _ = rendered
    result = cli_run("avatar.quality", out, "--audio", cli_speech_path, "--phones", cli_phones_path, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["missing_faces"] == 0
    assert figures["targets"] == {name: True for name in figures["targets"]}, figures


@pytest.mark.parametrize(
    "audio, extra, seconds",
    [
        ("clip8k", ["--fps", "30"], 1.2),
        ("clip48k", [], 1.2),
        ("stereo", ["--face", "0", "--body", "1"], 1.2),
        ("silent", [], 1.0),
    ],
)
def test_render_accepts_audio_formats(tmp_path, cli_run, cli_portrait_path, inputs, audio, extra, seconds):
    out = tmp_path / "new" / "out.mp4"  # a missing directory is created
    result = cli_run("avatar.render", "--portrait", cli_portrait_path, "--audio", inputs[audio],
                     "-o", out, "--size", 256, *extra)
    assert result.returncode == 0, result.stderr
    fps = float(extra[1]) if extra[:1] == ["--fps"] else FPS
    assert abs(decoded_frame_count(out) - math.ceil(seconds * fps)) <= 1
    assert [p.name for p in out.parent.iterdir()] == ["out.mp4"]  # no temporary file left


def test_render_downscales_a_huge_portrait_with_a_note(tmp_path, cli_run, inputs):
    out = tmp_path / "out.mp4"
    result = cli_run("avatar.render", "--portrait", inputs["huge"], "--audio", inputs["silent"], "-o", out,
                     "--size", 256)
    assert result.returncode == 0, result.stderr
    assert "2048x2048" in result.stderr and "downscaled" in result.stderr
    with av.open(str(out)) as container:
        assert (container.streams.video[0].width, container.streams.video[0].height) == (256, 256)


# (case, arguments replacing the defaults, phrase the one-line error must contain)
BAD_INPUTS = [
    ("missing portrait", {"--portrait": "absent.png"}, "portrait file not found"),
    ("corrupt image", {"--portrait": "corrupt"}, "not a readable image"),
    ("text as image", {"--portrait": "text"}, "not a readable image"),
    ("tiny image", {"--portrait": "tiny"}, "at least 128 pixels"),
    ("no face", {"--portrait": "gradient"}, "no face"),
    ("missing audio", {"--audio": "absent.wav"}, "audio file not found"),
    ("text as audio", {"--audio": "text"}, "cannot decode audio"),
    ("empty audio", {"--audio": "empty"}, "empty audio"),
    ("face above 1", {"--face": "1.5"}, "--face must be in [0, 1]"),
    ("negative body", {"--body": "-0.1"}, "--body must be in [0, 1]"),
    ("fps too low", {"--fps": "5"}, "--fps must be in [10, 60]"),
    ("fps not a number", {"--fps": "fast"}, "--fps must be a number"),
    ("size too big", {"--size": "4096"}, "--size must be in [128, 1024]"),
    ("not mp4", {"-o": "out.avi"}, "must be an .mp4 file"),
    ("output is a directory", {"-o": "folder.mp4"}, "is a directory"),
]


@pytest.mark.parametrize("case, changes, phrase", BAD_INPUTS, ids=[case for case, _, _ in BAD_INPUTS])
def test_render_bad_input_is_one_line_and_writes_nothing(
    tmp_path, cli_run, cli_portrait_path, cli_speech_path, inputs, case, changes, phrase
):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if case == "output is a directory":
        (out_dir / "folder.mp4").mkdir()
    args = {"--portrait": str(cli_portrait_path), "--audio": str(cli_speech_path), "-o": str(out_dir / "out.mp4"),
            "--size": "256"}
    for flag, value in changes.items():
        args[flag] = str(inputs[value]) if value in inputs else str(out_dir / value) if flag == "-o" else value
    result = cli_run("avatar.render", *[item for pair in args.items() for item in pair])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("avatar-render: error:") and phrase in lines[0]
    assert [p.name for p in out_dir.iterdir()] == (["folder.mp4"] if case == "output is a directory" else [])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_render_leaves_nothing(tmp_path, cli_portrait_path, signum):
    long_speech = Path("/work/shared/data/speech/librivox_0870.wav")  # 7.1 s: still rendering when signalled
    out = tmp_path / "out.mp4"
    process = subprocess.Popen(
        [sys.executable, "-m", "avatar.render", "--portrait", str(cli_portrait_path), "--audio", str(long_speech),
         "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        seen = b""
        while b"frame" not in seen:  # the progress bar appears once the output file is open
            data = process.stderr.read1(4096)
            assert data, "render ended before its progress bar appeared"
            seen += data
        assert list(tmp_path.iterdir()), "the partial output should exist while rendering"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130
    assert b"Traceback" not in stderr and b"interrupted" in stderr
    assert list(tmp_path.iterdir()) == []


def test_load_audio_keeps_channels_and_rate(inputs):
    samples, rate = load_audio(inputs["stereo"])
    assert rate == 16_000 and samples.dtype == np.float32 and samples.shape == (int(1.2 * 16_000), 2)
    assert np.allclose(samples[:, 1], 0.5 * samples[:, 0], atol=2 / 32768)


@pytest.mark.parametrize("codec, suffix", [("flac", "flac"), ("libopus", "ogg"), ("aac", "m4a"), ("mp3", "mp3")])
def test_load_audio_decodes_compressed_formats(tmp_path, inputs, codec, suffix):
    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg build has no {codec} encoder")
    source, _ = load_audio(inputs["clip16k"])
    path = tmp_path / f"clip.{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=16_000, layout="mono")
        frame = av.AudioFrame.from_ndarray(source.T.copy(), format="flt", layout="mono")
        frame.sample_rate = 16_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    samples, rate = load_audio(path)
    assert samples.shape[1] == 1 and rate in (16_000, 48_000)  # the Opus decoder always gives 48 kHz
    decoded, original = to_mono_16k(samples, rate), source[:, 0]
    assert abs(decoded.shape[0] - original.shape[0]) <= 2048  # codec delay and padding
    # Same waveform up to the codec's delay: the normalised cross-correlation peaks near 1.
    peak = correlate(decoded, original, mode="full").max()
    assert peak / np.sqrt((decoded @ decoded) * (original @ original)) > 0.9


def test_load_audio_rejects_rates_outside_the_accepted_range(tmp_path, inputs):
    source, _ = load_audio(inputs["clip16k"])
    path = write_wav(tmp_path / "low.wav", source[::4, 0], 4_000)
    with pytest.raises(AudioFileError, match="accepted: 8000 to 48000 Hz"):
        load_audio(path)


def test_to_mono_16k_resamples_and_mixes(inputs):
    samples, rate = load_audio(inputs["clip48k"])
    reference, _ = load_audio(inputs["clip16k"])
    mono = to_mono_16k(np.repeat(samples, 2, axis=1), rate)
    assert mono.shape == (reference.shape[0],)
    assert np.corrcoef(mono, reference[:, 0])[0, 1] > 0.99


@pytest.mark.parametrize(
    "name, problem",
    [("absent.wav", "not found"), ("text", "cannot decode"), ("empty", "empty audio"), ("tiny", "no audio stream")],
)
def test_load_audio_errors(inputs, tmp_path, name, problem):
    with pytest.raises(AudioFileError, match=problem):
        load_audio(inputs.get(name, tmp_path / name))

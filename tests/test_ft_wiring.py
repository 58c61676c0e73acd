"""The FantasyTalking generator behind the user-facing tools: ``avatar-render
--generator fantasytalking[-tiny]`` and the server's AVATAR_GENERATOR /
AVATAR_WEIGHTS settings. Tiny random networks only; nothing downloaded."""
from __future__ import annotations

import av
import numpy as np
import pytest

from avatar.clock import VirtualClock
from avatar.frames import AudioChunk
from server.app import create_app
from server.config import Settings, SettingsError


def render(capsys, *args) -> tuple[int, str, str]:
    """``avatar-render ARGS`` in this process (its imports are already loaded):
    (exit status, stdout, stderr)."""
    from avatar.render import main

    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_render_cli_runs_the_tiny_diffusion_generator(tmp_path, capsys, cli_portrait_path, media_speech):
    from scipy.io import wavfile

    clip = tmp_path / "one_second.wav"
    wavfile.write(clip, 16000, media_speech[4000:20000])  # 1 s with speech
    out = tmp_path / "tiny.mp4"
    status, stdout, stderr = render(capsys, "--portrait", cli_portrait_path, "--audio", clip, "-o", out,
                                    "--generator", "fantasytalking-tiny", "--size", "128")
    assert status == 0, stderr
    assert "23 frames (1.00 s at 23 fps)" in stdout  # the generator's own fps
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 23 and frames[0].shape == (128, 128, 3)


def test_render_cli_names_what_is_missing_from_the_weights(tmp_path, capsys, cli_portrait_path, cli_speech_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    out = tmp_path / "out.mp4"
    status, _, stderr = render(capsys, "--portrait", cli_portrait_path, "--audio", cli_speech_path, "-o", out,
                               "--generator", "fantasytalking", "--weights", weights)
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "fantasytalking_model.ckpt" in lines[0] and "Traceback" not in stderr
    assert not out.exists()
    with pytest.raises(SystemExit) as exited:
        render(capsys, "--portrait", cli_portrait_path, "--audio", cli_speech_path, "-o", out,
               "--generator", "fantasytalking")
    assert exited.value.code == 2 and "needs --weights" in capsys.readouterr().err


def test_server_settings_choose_the_generator(tmp_path):
    settings = Settings.from_env({"AVATAR_GENERATOR": "fantasytalking", "AVATAR_WEIGHTS": str(tmp_path)})
    assert settings.generator == "fantasytalking" and settings.weights == tmp_path
    assert Settings.from_env({}).generator == "animator"
    with pytest.raises(SettingsError, match="AVATAR_WEIGHTS"):
        Settings.from_env({"AVATAR_GENERATOR": "fantasytalking"})
    with pytest.raises(SettingsError, match="AVATAR_GENERATOR must be one of animator, fantasytalking"):
        Settings.from_env({"AVATAR_GENERATOR": "diffusion"})


def test_server_refuses_incomplete_weights_at_start(server_settings, tmp_path):
    with pytest.raises(FileNotFoundError, match="fantasytalking_model.ckpt"):
        create_app(server_settings(generator="fantasytalking", weights=tmp_path))


async def test_server_session_on_the_tiny_diffusion_generator_streams_frames(
    server_settings, server_running, media_speech
):
    app = create_app(server_settings(generator="fantasytalking-tiny"), clock_factory=VirtualClock)
    async with server_running(app) as srv:
        refused = await srv.http.post("/v1/sessions", json={"generator": "animator"})
        created = await srv.http.post("/v1/sessions", json={})
        assert created.status_code == 201, created.text
        answer = created.json()
        live = srv.manager.get(answer["session_id"])
        await live.avatar.push_audio(AudioChunk(media_speech[:16000].astype(np.float32) / 32768.0, 16000))
        live.avatar.end_of_speech()
        frames = []
        async for frame in live.avatar:
            frames.append(frame)
            if len(frames) == 40:
                break
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "generator_unavailable"
    assert answer["generator"] == "fantasytalking-tiny" and answer["fps"] == 23.0
    assert {f.video.image.shape for f in frames} == {(128, 128, 3)}
    assert any(f.speaking for f in frames)
    assert len({f.video.image.tobytes() for f in frames}) > 1  # the diffusion model draws every frame


def test_generator_from_a_weights_directory(tmp_path, cli_portrait_path):
    """``from_weights`` on a complete tiny weights directory (the layout the checkpoint
    tests write): prompts from the precomputed file, then from the text encoder."""
    import torch
    from test_ft_checkpoint import build_weights_dir

    from model.base import MotionSettings, clip_windows
    from model.errors import WeightsError
    from model.fantasytalking.checkpoint import PROMPT_EMBEDS
    from model.fantasytalking.conditioning import NEGATIVE_PROMPT, save_prompt_embeddings
    from model.fantasytalking.config import FantasyTalkingConfig
    from model.fantasytalking.generator import FantasyTalkingGenerator
    from model.portrait import load_portrait

    config = FantasyTalkingConfig(steps=1, max_side=32, window_frames=13, motion_frames=5)
    portrait = load_portrait(cli_portrait_path, size=128)
    audio = np.zeros(16000, np.float32)
    build_weights_dir(tmp_path / "file")
    save_prompt_embeddings(tmp_path / "file" / PROMPT_EMBEDS, {"": torch.randn(1, 16)})
    with pytest.raises(WeightsError, match="no embedding for prompt"):
        FantasyTalkingGenerator.from_weights(tmp_path / "file", config, device="cpu")
    save_prompt_embeddings(tmp_path / "file" / PROMPT_EMBEDS, {"": torch.randn(1, 16), NEGATIVE_PROMPT: torch.randn(9, 16)})
    build_weights_dir(tmp_path / "encoder", prompt_file=False)
    for weights in (tmp_path / "file", tmp_path / "encoder"):
        generator = FantasyTalkingGenerator.from_weights(weights, config, device="cpu")
        assert generator.version == "1-wan21-13f-32px"
        prepared = generator.prepare(portrait)
        window = next(clip_windows(audio, generator))
        frames, state = generator.generate(prepared, window, MotionSettings(), None)
        assert frames.shape == (8, 32, 32, 3) and state.next_frame == 8

"""The outgoing VP8 encoder (server/video_encoder.py): aiortc-compatible RTP
payloads that decode back to the frames, keyframes on request, the bitrate cap,
and the answer that offers VP8 only."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription, VideoStreamTrack
from aiortc.codecs.vpx import vp8_depayload

from server.video_encoder import MAX_BITRATE, START_BITRATE, AvatarVp8Encoder, install_video_encoder


def moving_frames(count: int, size: int = 128) -> list[av.VideoFrame]:
    """A bright square sliding over a gradient, as I420 frames at 25 fps (90 kHz pts)."""
    ys, xs = np.mgrid[0:size, 0:size]
    frames = []
    for n in range(count):
        rgb = np.dstack([xs * 2, ys * 2, np.full_like(xs, 80)]).astype(np.uint8)
        rgb[40:72, 10 + 2 * n:42 + 2 * n] = 240
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts, frame.time_base = 3600 * n, Fraction(1, 90000)
        frames.append(frame)
    return frames


def is_keyframe(payloads: list[bytes]) -> bool:
    """VP8 frame tag: bit 0 of the first byte is 0 for a keyframe (RFC 6386 9.1)."""
    return (vp8_depayload(payloads[0])[0] & 1) == 0


def test_payloads_decode_back_to_the_frames_and_keyframes_come_on_request():
    encoder, decoder = AvatarVp8Encoder(), av.CodecContext.create("libvpx", "r")
    frames = moving_frames(20)
    keyframes = []
    for n, frame in enumerate(frames):
        payloads, timestamp = encoder.encode(frame, force_keyframe=(n == 12))
        assert timestamp == 3600 * n and all(len(p) <= 1300 for p in payloads)
        keyframes.append(is_keyframe(payloads))
        (decoded,) = decoder.decode(av.Packet(b"".join(vp8_depayload(p) for p in payloads)))
        error = decoded.to_ndarray(format="rgb24").astype(float) - frame.to_ndarray(format="rgb24")
        assert 10 * np.log10(255**2 / np.mean(error**2)) > 30  # dB PSNR
    assert [n for n, key in enumerate(keyframes) if key] == [0, 12]


def test_bitrate_starts_below_the_cap_stays_within_it_and_rebuilds_only_on_large_changes():
    encoder = AvatarVp8Encoder()
    assert encoder.target_bitrate == START_BITRATE
    encoder.target_bitrate = 10 * MAX_BITRATE  # what a generous REMB asks
    assert encoder.target_bitrate == MAX_BITRATE
    frames = moving_frames(4)
    encoder.encode(frames[0])
    opened = encoder.codec
    encoder.target_bitrate = MAX_BITRATE * 0.9  # within REBUILD_AFTER: same codec, no keyframe
    payloads, _ = encoder.encode(frames[1])
    assert encoder.codec is opened and not is_keyframe(payloads)
    encoder.target_bitrate = MAX_BITRATE // 2  # a real drop: rebuilt at the new rate
    payloads, _ = encoder.encode(frames[2])
    assert encoder.codec is not opened and encoder.codec.bit_rate == MAX_BITRATE // 2 and is_keyframe(payloads)


@pytest.mark.parametrize("first, installed", [("video/VP8", True), ("video/H264", False)])
async def test_installed_when_the_answer_chose_vp8_else_aiortc_keeps_its_own(first, installed):
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    server = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        transceiver = client.addTransceiver("video", direction="recvonly")
        capabilities = RTCRtpReceiver.getCapabilities("video").codecs
        transceiver.setCodecPreferences(sorted(capabilities, key=lambda c: c.mimeType != first))
        await client.setLocalDescription(await client.createOffer())
        await server.setRemoteDescription(RTCSessionDescription(client.localDescription.sdp, "offer"))
        sender = server.addTrack(VideoStreamTrack())
        await server.setLocalDescription(await server.createAnswer())
        assert install_video_encoder(sender, server.localDescription.sdp) is installed
        assert isinstance(sender._RTCRtpSender__encoder, AvatarVp8Encoder) is installed
    finally:
        await client.close()
        await server.close()

// The WebRTC side: one peer connection that receives the avatar's video and
// voice and, optionally, sends the microphone. Signalling is one HTTP POST of a
// complete offer (non-trickle), so ICE gathering must finish first.

import { postOffer } from "./api.js";

// Loopback and LAN gathering takes milliseconds; past this we send what we have
// rather than leave the user waiting on a candidate that will never come.
const GATHER_TIMEOUT_MS = 5000;

function iceGatheringComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", onChange);
      resolve();
    };
    const onChange = () => { if (pc.iceGatheringState === "complete") done(); };
    const timer = setTimeout(done, GATHER_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", onChange);
  });
}

/**
 * Connect to a session's media. `iceServers` comes from the session response
 * (empty on a LAN); `micTrack` is a microphone MediaStreamTrack or null (then
 * audio is receive-only). The remote stream is attached to `videoElement`;
 * `onConnectionState(state)` reports RTCPeerConnection.connectionState changes.
 * Resolves to the RTCPeerConnection; rejects with ApiError from signalling.
 */
export async function connectMedia({ offerUrl, token, iceServers, micTrack, videoElement, onConnectionState }) {
  const pc = new RTCPeerConnection({ iceServers: iceServers || [] });
  const remote = new MediaStream();
  videoElement.srcObject = remote;
  pc.addEventListener("track", (event) => {
    remote.addTrack(event.track);
    // Autoplay with sound can be refused until the user interacts; the Start
    // click counts as interaction, so this normally just plays.
    videoElement.play().catch(() => {});
  });
  pc.addEventListener("connectionstatechange", () => onConnectionState(pc.connectionState));

  pc.addTransceiver("video", { direction: "recvonly" });
  if (micTrack) {
    pc.addTransceiver(micTrack, { direction: "sendrecv" });
  } else {
    pc.addTransceiver("audio", { direction: "recvonly" });
  }

  try {
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc);
    const answer = await postOffer(offerUrl, token, pc.localDescription);
    await pc.setRemoteDescription(answer);
  } catch (exc) {
    pc.close();
    throw exc;
  }
  return pc;
}

/**
 * Receiver-side numbers from `pc.getStats()`: {framesDecoded, framesPerSecond,
 * jitterBufferMs (mean video jitter-buffer delay), rttMs (ICE round trip)};
 * a field is null when the browser does not report it yet.
 */
export async function receiverStats(pc) {
  const out = { framesDecoded: null, framesPerSecond: null, jitterBufferMs: null, rttMs: null };
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") {
      out.framesDecoded = s.framesDecoded ?? null;
      out.framesPerSecond = s.framesPerSecond ?? null;
      if (s.jitterBufferEmittedCount > 0) {
        out.jitterBufferMs = (1000 * s.jitterBufferDelay) / s.jitterBufferEmittedCount;
      }
    } else if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime != null) {
      out.rttMs = 1000 * s.currentRoundTripTime;
    }
  });
  return out;
}

// Speech from an audio file: decode in the browser, resample to 16 kHz mono,
// send as PCM16 little-endian binary frames over the events channel.

export const SEND_RATE_HZ = 16000;
// 20 ms frames, the usual packet size of a voice stream.
export const CHUNK_SAMPLES = 320;
// Send at twice real time: faster than playback (the server buffers, as with a
// TTS engine) yet 100 messages/s, well under the server's per-second limit
// (200 by default), so no frame is dropped as a flood.
const CHUNKS_PER_TICK = 10;
const TICK_MS = 100;

/**
 * Decode an audio File (any format the browser can decode) and resample it to
 * 16 kHz mono. Resolves to an Int16Array of PCM16 samples; rejects with an
 * Error whose message says the file could not be decoded.
 */
export async function decodeToPcm16(file) {
  const bytes = await file.arrayBuffer();
  const context = new AudioContext();
  let decoded;
  try {
    decoded = await context.decodeAudioData(bytes);
  } catch {
    throw new Error(`"${file.name}" is not an audio file this browser can decode (try WAV, MP3 or Ogg).`);
  } finally {
    context.close();
  }
  const frames = Math.max(1, Math.ceil(decoded.duration * SEND_RATE_HZ));
  // A one-channel OfflineAudioContext down-mixes and resamples in one pass.
  const offline = new OfflineAudioContext(1, frames, SEND_RATE_HZ);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const rendered = await offline.startRendering();
  const floats = rendered.getChannelData(0);
  const pcm = new Int16Array(floats.length);
  for (let i = 0; i < floats.length; i++) {
    const v = Math.max(-1, Math.min(1, floats[i]));
    pcm[i] = v < 0 ? v * 0x8000 : v * 0x7fff;
  }
  return pcm;
}

/** PCM16 little-endian bytes of `samples` (an Int16Array), whatever the host byte order. */
function littleEndianBytes(samples) {
  const buffer = new ArrayBuffer(samples.length * 2);
  const view = new DataView(buffer);
  samples.forEach((v, i) => view.setInt16(2 * i, v, true));
  return buffer;
}

/**
 * Send `pcm` (16 kHz Int16Array) as one utterance: `audio_format`, 20 ms
 * binary frames paced at twice real time, then `speech_end`. Stops early
 * (without `speech_end`) when `signal` aborts or the channel closes.
 * Resolves to the number of frames sent.
 */
export async function streamUtterance(channel, pcm, signal) {
  channel.send({ type: "audio_format", sample_rate: SEND_RATE_HZ });
  let sent = 0;
  for (let start = 0; start < pcm.length; start += CHUNK_SAMPLES) {
    if (signal.aborted || !channel.isOpen) return sent;
    channel.sendBinary(littleEndianBytes(pcm.subarray(start, start + CHUNK_SAMPLES)));
    sent += 1;
    if (sent % CHUNKS_PER_TICK === 0) {
      await new Promise((resolve) => setTimeout(resolve, TICK_MS));
    }
  }
  if (!signal.aborted) channel.send({ type: "speech_end" });
  return sent;
}

// The demo page: wires the controls to one avatar session at a time.
// Session life: (upload portrait) -> POST /v1/sessions -> events WebSocket ->
// WebRTC offer/answer -> ... -> DELETE /v1/sessions/{id}.

import { ApiError, createSession, deleteSession, uploadPortrait } from "./api.js";
import { decodeToPcm16, streamUtterance } from "./audio.js";
import { EventChannel, eventsSocketUrl } from "./events.js";
import { connectMedia, receiverStats } from "./rtc.js";

// set_motion is sent once the slider rests this long: dragging would otherwise
// send a message per pixel and run into the server's rate limit.
const MOTION_DEBOUNCE_MS = 150;
const STATS_POLL_MS = 1000;
const LOG_LINES = 100;
// Server events kept for automation (window.avatarDemo.events), oldest dropped.
const EVENTS_KEPT = 500;

const $ = (id) => document.getElementById(id);
const ui = {
  message: $("message"), video: $("video"), placeholder: $("video-placeholder"),
  state: $("state"), connection: $("connection"),
  portraitFile: $("portrait-file"), fps: $("fps"), mic: $("mic"), apiKey: $("api-key"),
  start: $("start"), stop: $("stop"),
  sayForm: $("say-form"), sayText: $("say-text"), say: $("say"),
  audioFile: $("audio-file"), speakFile: $("speak-file"), interrupt: $("interrupt"),
  face: $("face"), body: $("body"), faceValue: $("face-value"), bodyValue: $("body-value"),
  log: $("log"),
};

/** For automation and the devtools console: `events`, what the page received
 * from the server in order ({seq, at: performance.now() ms, type, ...fields});
 * `sessionId`, the current session's id (null when none). */
const demo = { events: [], nextSeq: 0, sessionId: null };
window.avatarDemo = demo;

let session = null; // {id, token, channel, pc, micStream, statsTimer, upload, endedBecause}

// -- messages and log --------------------------------------------------------

function showMessage(text, kind = "error") {
  // Server messages start in lower case (they are also log lines); here they stand alone.
  ui.message.textContent = text.charAt(0).toUpperCase() + text.slice(1);
  ui.message.classList.toggle("info", kind === "info");
  ui.message.hidden = false;
}

function clearMessage() {
  ui.message.hidden = true;
  ui.message.textContent = "";
}

function describe(exc) {
  return exc && exc.message ? exc.message : String(exc);
}

function log(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  ui.log.append(item);
  while (ui.log.children.length > LOG_LINES) ui.log.firstElementChild.remove();
  ui.log.scrollTop = ui.log.scrollHeight;
}

// -- display ---------------------------------------------------------------------

function setState(state) {
  ui.state.dataset.state = state;
  ui.state.textContent = state;
}

function setStat(name, text) {
  document.querySelector(`[data-stat="${name}"]`).textContent = text;
}

const fixed = (value, digits, unit = "") => (value == null ? "–" : `${Number(value).toFixed(digits)}${unit}`);
const millis = (seconds) => (seconds == null ? "–" : `${Math.round(1000 * seconds)} ms`);

function showServerStats(s) {
  setStat("fps", fixed(s.fps, 1));
  setStat("ttff", millis(s.time_to_first_frame_s));
  setStat("lip", millis(s.audio_to_lip_latency_s));
  setStat("rtf", fixed(s.rtf, 2));
  setStat("queued", fixed(s.queued_ms, 0, " ms"));
  setStat("dropped", s.dropped_frames == null ? "–" : String(s.dropped_frames));
}

function showReceiverStats(r) {
  setStat("decoded", r.framesDecoded == null ? "–" : String(r.framesDecoded));
  setStat("browser-fps", fixed(r.framesPerSecond, 0));
  setStat("jitter", fixed(r.jitterBufferMs, 0, " ms"));
  setStat("rtt", fixed(r.rttMs, 1, " ms"));
}

function setRunning(running) {
  ui.start.disabled = running;
  ui.stop.disabled = !running;
  for (const control of [ui.say, ui.speakFile, ui.interrupt]) control.disabled = !running;
  for (const control of [ui.fps, ui.apiKey, ui.portraitFile]) control.disabled = running;
  document.querySelectorAll('input[name="portrait"]').forEach((r) => { r.disabled = running; });
  ui.placeholder.hidden = running;
}

// -- server events -----------------------------------------------------------------

function onServerEvent(event) {
  demo.events.push({ seq: demo.nextSeq++, at: performance.now(), ...event });
  if (demo.events.length > EVENTS_KEPT) demo.events.shift();
  switch (event.type) {
    case "state":
      setState(event.state);
      log(`state: ${event.state}`);
      break;
    case "playback_started":
      log("playback started");
      break;
    case "playback_finished":
      log(`playback finished after ${fixed(event.position, 2, " s")}${event.interrupted ? " (interrupted)" : ""}`);
      break;
    case "stats":
      showServerStats(event);
      break;
    case "error":
      showMessage(`${event.message} (${event.code})`);
      log(`error ${event.code}: ${event.message}`);
      break;
    case "pong":
      break;
    default:
      log(`${event.type}: ${JSON.stringify(event)}`);
  }
}

// -- session life ------------------------------------------------------------------

function motion() {
  return { face: Number(ui.face.value), body: Number(ui.body.value) };
}

async function chosenPortraitId(apiKey) {
  const choice = document.querySelector('input[name="portrait"]:checked').value;
  if (choice === "bundled") return null;
  const file = ui.portraitFile.files[0];
  if (!file) throw new Error("Choose a photo to upload, or pick the bundled portrait.");
  log(`uploading ${file.name}`);
  const portrait = await uploadPortrait(file, apiKey);
  log(`portrait ${portrait.portrait_id.slice(0, 12)}… (${portrait.width}×${portrait.height})`);
  return portrait.portrait_id;
}

async function openMicrophone() {
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, channelCount: 1 },
    });
  } catch (exc) {
    showMessage(`The microphone is not available (${exc.message}); the session runs without it.`, "info");
    return null;
  }
}

async function start() {
  clearMessage();
  const apiKey = ui.apiKey.value.trim();
  const fps = Number(ui.fps.value);
  if (!(fps >= 10 && fps <= 60)) {
    showMessage("Frames per second must be a number from 10 to 60.");
    return;
  }
  setRunning(true);
  // Stop may be clicked while this runs: `session !== current` then means give up.
  const current = { id: null, token: null, channel: null, pc: null, micStream: null,
    statsTimer: null, upload: null, endedBecause: null };
  session = current;
  try {
    const portraitId = await chosenPortraitId(apiKey);
    const created = await createSession({ portraitId, motion: motion(), fps }, apiKey);
    current.id = created.session_id;
    current.token = created.token;
    if (session !== current) return void deleteSession(current.id, current.token).catch(() => {});
    demo.sessionId = current.id;
    log(`session ${current.id} created`);

    // Events first, so the first state change is not missed.
    // Events from a session that was stopped meanwhile (its `session_ended`) are not news.
    current.channel = new EventChannel(eventsSocketUrl(created.events_url, created.token), {
      onEvent: (event) => {
        if (session !== current) return;
        if (event.type === "error" && event.code === "session_ended") current.endedBecause = event.message;
        onServerEvent(event);
      },
      onClosed: (reason) => {
        if (reason && session === current) {
          stop({ serverGone: true });
          // The server's own reason (idle timeout, ...) says more than the close code.
          showMessage(current.endedBecause || reason);
        }
      },
    });
    await current.channel.opened;

    current.micStream = ui.mic.checked ? await openMicrophone() : null;
    const micTrack = current.micStream ? current.micStream.getAudioTracks()[0] : null;
    current.pc = await connectMedia({
      offerUrl: created.offer_url,
      token: created.token,
      iceServers: created.ice_servers,
      micTrack,
      videoElement: ui.video,
      onConnectionState: (state) => { if (session === current) onConnectionState(state); },
    });
    if (session !== current) return void release(current);
    current.statsTimer = setInterval(pollReceiverStats, STATS_POLL_MS);
    log(micTrack ? "media connecting (with microphone)" : "media connecting");
  } catch (exc) {
    if (session !== current) { // stopped meanwhile: drop what was opened since
      release(current);
      return;
    }
    await stop();
    showMessage(describe(exc));
  }
}

function onConnectionState(state) {
  ui.connection.textContent = state;
  ui.connection.dataset.connection = state;
  if (state === "failed") {
    showMessage("The media connection failed: no network path to the server's video (a firewall, or a TURN server is needed).");
  }
}

async function pollReceiverStats() {
  if (!session || !session.pc) return;
  showReceiverStats(await receiverStats(session.pc));
}

/** Close what the page holds for `ending` (upload, timer, channel, peer, microphone). */
function release(ending) {
  if (ending.upload) ending.upload.abort();
  clearInterval(ending.statsTimer);
  if (ending.channel) ending.channel.close();
  if (ending.pc) ending.pc.close();
  if (ending.micStream) ending.micStream.getTracks().forEach((t) => t.stop());
}

/** End the session: the server's first, unless it is already gone (closing the
 * media first would make the server end it on its own and the DELETE find
 * nothing), then what the page holds. */
async function stop({ serverGone = false } = {}) {
  const ending = session;
  session = null;
  demo.sessionId = null;
  setRunning(false);
  setState("no session");
  ui.state.dataset.state = "none";
  ui.connection.textContent = "not connected";
  ui.video.srcObject = null;
  if (!ending) return;
  if (ending.upload) ending.upload.abort();
  clearInterval(ending.statsTimer);
  try {
    if (!serverGone && ending.id) {
      await deleteSession(ending.id, ending.token);
      log(`session ${ending.id} ended`);
    }
  } catch (exc) {
    // Already gone (timed out) is the outcome we wanted anyway.
    if (!(exc instanceof ApiError && exc.status === 404)) showMessage(describe(exc));
  } finally {
    release(ending);
  }
}

// -- speaking ------------------------------------------------------------------------

function say(event) {
  event.preventDefault();
  const text = ui.sayText.value.trim();
  if (!text) {
    showMessage("Type something for the avatar to say.");
    return;
  }
  if (!session || !session.channel) return;
  clearMessage();
  session.channel.send({ type: "say", text });
  log(`say: ${text.length > 40 ? text.slice(0, 40) + "…" : text}`);
}

async function speakFile() {
  const file = ui.audioFile.files[0];
  if (!file) {
    showMessage("Choose an audio file first.");
    return;
  }
  const current = session;
  if (!current || !current.channel) return;
  clearMessage();
  if (current.upload) current.upload.abort();
  const upload = new AbortController();
  current.upload = upload;
  try {
    const pcm = await decodeToPcm16(file);
    log(`speaking ${file.name} (${(pcm.length / 16000).toFixed(1)} s)`);
    await streamUtterance(current.channel, pcm, upload.signal);
  } catch (exc) {
    showMessage(describe(exc));
  } finally {
    if (current.upload === upload) current.upload = null;
  }
}

function interrupt() {
  if (!session || !session.channel) return;
  if (session.upload) session.upload.abort();
  session.channel.send({ type: "interrupt" });
  log("interrupt");
}

// -- motion ----------------------------------------------------------------------------

let motionTimer = null;

function onSlider() {
  ui.faceValue.textContent = Number(ui.face.value).toFixed(2);
  ui.bodyValue.textContent = Number(ui.body.value).toFixed(2);
  clearTimeout(motionTimer);
  motionTimer = setTimeout(() => {
    if (!session || !session.channel) return;
    session.channel.send({ type: "set_motion", ...motion() });
    log(`set_motion face ${ui.face.value}, body ${ui.body.value}`);
  }, MOTION_DEBOUNCE_MS);
}

function onMicToggle() {
  if (!session) return;
  if (session.micStream) {
    // A disabled track sends silence: the server's voice detector ends the utterance.
    session.micStream.getAudioTracks().forEach((t) => { t.enabled = ui.mic.checked; });
    log(ui.mic.checked ? "microphone on" : "microphone muted");
  } else if (ui.mic.checked) {
    showMessage("The microphone is used from the next session (start it again with the box ticked).", "info");
  }
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", () => stop());
ui.sayForm.addEventListener("submit", say);
ui.speakFile.addEventListener("click", speakFile);
ui.interrupt.addEventListener("click", interrupt);
ui.face.addEventListener("input", onSlider);
ui.body.addEventListener("input", onSlider);
ui.mic.addEventListener("change", onMicToggle);
window.addEventListener("pagehide", () => stop());
setRunning(false);
setState("no session");
ui.state.dataset.state = "none";

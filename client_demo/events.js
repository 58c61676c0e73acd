// The session's events WebSocket: JSON control messages and PCM16 audio out,
// JSON events in. Browsers cannot set headers on a WebSocket, so the session
// token travels in the query string.

// What the server's application close codes mean, in words for the user.
const CLOSE_REASONS = {
  4401: "The events channel was refused: no session token was given.",
  4403: "The events channel was refused: the session token is wrong.",
  4404: "The session no longer exists (it ended or timed out).",
  4429: "The server closed the events channel: too many messages were sent.",
};

/** Absolute ws(s):// URL for `eventsUrl` (absolute or a path), with the token. */
export function eventsSocketUrl(eventsUrl, token) {
  const url = new URL(eventsUrl, window.location.href);
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  if (!url.searchParams.has("token")) url.searchParams.set("token", token);
  return url.toString();
}

/**
 * An open events channel. `onEvent(obj)` gets every server JSON message;
 * `onClosed(reason)` gets a sentence when the server closes the channel
 * (null when closed by `close()`).
 */
export class EventChannel {
  constructor(url, { onEvent, onClosed }) {
    this.socket = new WebSocket(url);
    this.socket.binaryType = "arraybuffer";
    this.closedByUs = false;
    this.opened = new Promise((resolve, reject) => {
      this.socket.addEventListener("open", () => resolve(), { once: true });
      this.socket.addEventListener("close", () => reject(new Error("the events channel closed before opening")), { once: true });
    });
    // The rejection above is also reported through onClosed; keep it from
    // showing up as an unhandled rejection when nobody awaits `opened`.
    this.opened.catch(() => {});
    this.socket.addEventListener("message", (msg) => {
      if (typeof msg.data !== "string") return;
      let event;
      try {
        event = JSON.parse(msg.data);
      } catch {
        onEvent({ type: "error", code: "bad_event", message: "The server sent a message that is not JSON." });
        return;
      }
      onEvent(event);
    });
    this.socket.addEventListener("close", (ev) => {
      if (this.closedByUs) {
        onClosed(null);
      } else if (ev.code === 1000) {
        onClosed("The server ended the session.");
      } else {
        onClosed(CLOSE_REASONS[ev.code] || `The events channel closed unexpectedly (code ${ev.code}${ev.reason ? ": " + ev.reason : ""}).`);
      }
    });
  }

  /** Whether messages can be sent now. */
  get isOpen() {
    return this.socket.readyState === WebSocket.OPEN;
  }

  /** Bytes queued in the browser and not yet sent. */
  get bufferedAmount() {
    return this.socket.bufferedAmount;
  }

  /** Send one control message (an object, sent as JSON). */
  send(message) {
    if (this.isOpen) this.socket.send(JSON.stringify(message));
  }

  /** Send one binary audio frame (an ArrayBuffer or typed array). */
  sendBinary(data) {
    if (this.isOpen) this.socket.send(data);
  }

  close() {
    this.closedByUs = true;
    this.socket.close(1000, "client done");
  }
}

// HTTP calls to the session server. Every failure becomes an ApiError whose
// message is a sentence a person can read (the server's error body when it
// sent one: {"error": {"code", "message"}}).

/** A failed request: `status` is the HTTP status (0 when the server could not
 * be reached), `code` the server's short error word. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

function authHeaders(secret) {
  return secret ? { Authorization: `Bearer ${secret}` } : {};
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's HTML page, say): fall back to the status line below.
  }
  const error = body && body.error;
  if (error && typeof error.message === "string") {
    return new ApiError(response.status, error.code || "error", error.message);
  }
  return new ApiError(response.status, "http_" + response.status,
    `The server answered ${response.status} ${response.statusText || ""}`.trim() + ".");
}

async function send(url, init) {
  let response;
  try {
    response = await fetch(url, init);
  } catch (exc) {
    throw new ApiError(0, "unreachable", `Could not reach the server (${exc.message}).`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response.status === 204 ? null : response.json();
}

/** Upload a portrait image (a File). Resolves to {portrait_id, width, height}. */
export function uploadPortrait(file, apiKey) {
  const form = new FormData();
  form.append("image", file, file.name);
  return send("/v1/portraits", { method: "POST", headers: authHeaders(apiKey), body: form });
}

/** Create a session. `portraitId` null means the bundled portrait; `motion` is
 * {face, body} in [0, 1]; `fps` in 10..60. Resolves to {session_id, token,
 * offer_url, events_url, ice_servers}. */
export function createSession({ portraitId, motion, fps }, apiKey) {
  const body = { generator: "animator", motion, fps };
  if (portraitId) body.portrait_id = portraitId;
  return send("/v1/sessions", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders(apiKey) },
    body: JSON.stringify(body),
  });
}

/** Send the SDP offer (complete, non-trickle) and resolve to the answer {sdp, type}. */
export function postOffer(offerUrl, token, offer) {
  return send(offerUrl, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders(token) },
    body: JSON.stringify({ sdp: offer.sdp, type: offer.type }),
  });
}

/** End a session on the server (frees everything it holds). */
export function deleteSession(sessionId, token) {
  return send(`/v1/sessions/${encodeURIComponent(sessionId)}`, {
    method: "DELETE",
    headers: authHeaders(token),
    // Lets the request finish when the page is being closed (pagehide).
    keepalive: true,
  });
}

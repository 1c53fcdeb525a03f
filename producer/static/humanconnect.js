// humanconnect.js: finish a Human Connect session from the browser.
//
//   import finishConnect from "https://your-humanconnect.example.com/humanconnect.js";
//   HumanConnect.open({
//     clientUserId, clientId, publicToken,
//     finish: async (err, sessionTokenObject) => {
//       const status = await finishConnect(sessionTokenObject, { ticket });
//       // status.status === "succeeded": status.publicToken is the user's publicToken
//     },
//   });
//
// POSTs the sessionTokenObject to /connect/finish with the ticket (Authorization: Bearer)
// and `Prefer: wait`; on 202 it follows statusUrl with backoff until the session ends or the
// deadline passes. Resolves with the final status body ({requestId, status: "succeeded",
// humanId, clientUserId, publicToken}); rejects with a HumanConnectError that says which
// HTTP status and why. No dependencies, no build step.
//
// The provider's current flow (the server mints the token Connect opens with):
//
//   import finishConnect, { connectToken } from ".../humanconnect.js";
//   const { token } = await connectToken({ ticket });      // data-hapi-token
//   // ... Connect's close callback hands over its payload:
//   const status = await finishConnect(closePayload, { ticket });
//   // status.status: "succeeded" (the access token is stored) or "nothing_connected"

export class HumanConnectError extends Error {
  constructor(message, { status = 0, body = null } = {}) {
    super(message);
    this.name = "HumanConnectError";
    /** The HTTP status that ended it (0: no answer, or the deadline passed). */
    this.status = status;
    /** The last JSON body seen, if any. */
    this.body = body;
  }
}

function moduleBase() {
  try {
    return new URL(".", import.meta.url).href.replace(/\/$/, "");
  } catch {
    return "";
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

function retryAfterMs(response, fallback) {
  const seconds = Number(response.headers.get("Retry-After"));
  return Number.isFinite(seconds) && seconds >= 0 ? seconds * 1000 : fallback;
}

/**
 * Finish a session; resolves with the final status body.
 * @param {{humanId: string, clientId: string, sessionToken: string}} sessionTokenObject
 * @param {{ticket?: string, wait?: number, baseUrl?: string, deadlineMs?: number,
 *          onStatus?: (status: object) => void}} [options]
 */
export async function finishConnect(sessionTokenObject, options = {}) {
  const {
    ticket,
    wait = 10,
    baseUrl = moduleBase(),
    deadlineMs = 120000,
    onStatus = () => {},
  } = options;
  if (!sessionTokenObject || typeof sessionTokenObject !== "object") {
    throw new HumanConnectError("finishConnect needs the sessionTokenObject from Connect");
  }
  const deadline = Date.now() + deadlineMs;
  const headers = { "Content-Type": "application/json" };
  if (ticket) headers.Authorization = `Bearer ${ticket}`;
  if (wait > 0) headers.Prefer = `wait=${Math.min(Math.floor(wait), 30)}`;
  // Only what the service reads: the close payload's two parts, or the session's three.
  const { sessionResults, currentConnections } = sessionTokenObject;
  const { humanId, clientId, sessionToken } = sessionTokenObject;
  const body = JSON.stringify(
    sessionResults ? { sessionResults, currentConnections } : { humanId, clientId, sessionToken },
  );

  let response;
  let pause = 500;
  for (;;) {
    try {
      response = await fetch(`${baseUrl}/connect/finish`, { method: "POST", headers, body });
    } catch (err) {
      throw new HumanConnectError(`could not reach humanconnect: ${err.message}`);
    }
    // Queue unavailable or over a limit: nothing was queued, sending again is safe.
    if ((response.status === 503 || response.status === 429) && Date.now() < deadline) {
      await sleep(retryAfterMs(response, pause));
      pause = Math.min(pause * 2, 5000);
      continue;
    }
    break;
  }
  const answer = await readJson(response);
  if (response.status === 201 || (response.status === 200 && answer)) {
    onStatus(answer);
    return answer;
  }
  if (response.status !== 202) {
    const reason = (answer && answer.error) || response.statusText || "refused";
    throw new HumanConnectError(`finish refused with ${response.status}: ${reason}`, {
      status: response.status,
      body: answer,
    });
  }
  onStatus(answer);
  return followStatus(new URL(answer.statusUrl, `${baseUrl}/`).href, deadline, onStatus);
}

async function followStatus(url, deadline, onStatus) {
  let pause = 250;
  let last = null;
  let lastState = null;
  while (Date.now() < deadline) {
    await sleep(pause);
    pause = Math.min(pause * 1.5, 3000);
    let response;
    try {
      response = await fetch(url, { headers: { Accept: "application/json" } });
    } catch {
      continue; // a blip: the session goes on in the background
    }
    if (!response.ok) {
      if (response.status === 503) continue;
      throw new HumanConnectError(`status answered ${response.status}`, {
        status: response.status,
        body: await readJson(response),
      });
    }
    last = await readJson(response);
    if (last && last.status !== lastState) {
      lastState = last.status;
      onStatus(last);
    }
    if (last && last.status === "succeeded") return last;
    if (last && last.status === "failed") {
      throw new HumanConnectError(`connect failed: ${last.error || "failed"}`, {
        status: 200,
        body: last,
      });
    }
  }
  throw new HumanConnectError("the session had not ended by the deadline", { body: last });
}

/**
 * The current flow: a token to open Connect with, for the ticket's user. Resolves with
 * {token, tokenType: "session" | "id", expiresIn, humanId}; a 503 (the provider busy) is
 * asked again after its Retry-After until the deadline.
 * @param {{ticket: string, baseUrl?: string, deadlineMs?: number}} options
 */
export async function connectToken({ ticket, baseUrl = moduleBase(), deadlineMs = 30000 } = {}) {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    let response;
    try {
      response = await fetch(`${baseUrl}/connect/token`, {
        method: "POST",
        headers: { Authorization: `Bearer ${ticket}` },
      });
    } catch (err) {
      throw new HumanConnectError(`could not reach humanconnect: ${err.message}`);
    }
    const answer = await readJson(response);
    if (response.status === 200) return answer;
    if (response.status === 503 && Date.now() < deadline) {
      await sleep(retryAfterMs(response, 1000));
      continue;
    }
    const reason = (answer && answer.error) || response.statusText || "refused";
    throw new HumanConnectError(`token refused with ${response.status}: ${reason}`, {
      status: response.status,
      body: answer,
    });
  }
}

export default finishConnect;

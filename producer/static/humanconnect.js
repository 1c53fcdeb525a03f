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
  const { humanId, clientId, sessionToken } = sessionTokenObject;
  const body = JSON.stringify({ humanId, clientId, sessionToken });

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
  if (response.status === 201) {
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

export default finishConnect;

// One error type for everything the SDK reports: HTTP problems, OAuth errors, network.

const PROBLEM_BASE = "https://vibe.cloud/problems/";

export class VibeError extends Error {
  /**
   * @param {string} message
   * @param {{status?: number, type?: string, body?: unknown, cause?: unknown}} [info]
   */
  constructor(message, info = {}) {
    super(message, info.cause === undefined ? undefined : { cause: info.cause });
    this.name = "VibeError";
    /** HTTP status (0: the network failed). */
    this.status = info.status ?? 0;
    /** The problem `type` URL, or an OAuth `error` code, or "network". */
    this.type = info.type ?? (this.status ? "about:blank" : "network");
    /** The server's answer, parsed when it was JSON. */
    this.body = info.body ?? null;
  }

  /** The last part of a problem type ("insufficient-scope", "conflict", ...). */
  get code() {
    return this.type.startsWith(PROBLEM_BASE) ? this.type.slice(PROBLEM_BASE.length) : this.type;
  }
}

/** A VibeError from a fetch Response that was not ok. */
export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (body && typeof body === "object") {
    if (typeof body.type === "string") {
      return new VibeError(body.detail || body.title || `HTTP ${response.status}`, {
        status: response.status,
        type: body.type,
        body,
      });
    }
    if (typeof body.error === "string") {
      return new VibeError(body.error_description || body.error, {
        status: response.status,
        type: body.error,
        body,
      });
    }
  }
  return new VibeError(`HTTP ${response.status}`, { status: response.status, body });
}

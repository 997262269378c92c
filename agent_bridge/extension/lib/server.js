// The agent's HTTP calls to one Vibe Cloud server (docs/agent.md). No cookies ever
// (credentials: "omit"): the agent holds its own tokens, the browser's cookie jar none.
// Every failure becomes an AgentError with a code and a sentence a person can act on.

import { challengeMessage } from "./protocol.js";
import { AgentError, b64url } from "./util.js";

const TIMEOUT = 20_000;

async function problemOf(response) {
  try {
    const body = await response.json();
    return body && typeof body === "object" ? body : {};
  } catch {
    return {};
  }
}

export class Server {
  constructor(base) {
    this.base = base;
  }

  async call(method, path, { body, token, form } = {}) {
    const headers = {};
    if (token) headers.Authorization = `Bearer ${token}`;
    let payload;
    if (form) {
      headers["Content-Type"] = "application/x-www-form-urlencoded";
      payload = new URLSearchParams(form);
    } else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(this.base + path, {
        method,
        headers,
        body: payload,
        credentials: "omit",
        cache: "no-store",
        redirect: "error",
        signal: AbortSignal.timeout(TIMEOUT),
      });
    } catch {
      throw new AgentError("unreachable", `Cannot reach ${this.base}. Check the address and your connection.`);
    }
    if (response.ok) {
      try {
        return response.status === 204 ? null : await response.json();
      } catch {
        throw this.notVibe(response.status);
      }
    }
    const problem = await problemOf(response);
    if (response.status === 429) {
      const wait = Number(response.headers.get("Retry-After")) || 60;
      throw new AgentError("too-many-requests", `Too many attempts; try again in ${wait} s.`);
    }
    if (response.status === 503) {
      throw new AgentError("unavailable", `${this.base} cannot serve this right now; try again in a moment.`);
    }
    const error = new AgentError(
      "server-refused",
      problem.detail || problem.error_description || `${this.base} answered ${response.status}.`,
    );
    error.status = response.status;
    error.problem = problem;
    return Promise.reject(error);
  }

  notVibe(status) {
    return new AgentError("not-vibe", `${this.base} does not answer like a Vibe Cloud server (${status}).`);
  }

  /** Password login: {identity, accessToken, expiresAt}. */
  async login(email, password) {
    try {
      return await this.call("POST", "/auth/login", { body: { email, password } });
    } catch (error) {
      if (error.status === 401) throw new AgentError("wrong-password", "The email or password is not right.");
      if (error.status === 404 || error.status === 405) throw this.notVibe(error.status);
      throw error;
    }
  }

  /**
   * End the session a first-party token belongs to (POST /auth/logout with the token: the
   * agent keeps no cookie). Used once, for the password login that adds an identity; every
   * later login is a DID login that makes no session. Best effort.
   */
  async logout(token) {
    try {
      await this.call("POST", "/auth/logout", { token });
    } catch {
      // Offline: the session stays listed in the person's dashboard, where it can be ended.
    }
  }

  /** GET /me/key with a first-party token. */
  key(token) {
    return this.call("GET", "/me/key", { token });
  }

  /**
   * A first-party token by DID challenge: sign with ``key`` for exactly this server. A
   * challenge whose audience is another server is never signed.
   */
  async didLogin(did, key, sign) {
    const challenge = await this.call("GET", "/auth/challenge");
    if (!challenge || typeof challenge.nonce !== "string" || typeof challenge.aud !== "string") {
      throw this.notVibe(200);
    }
    if (challenge.aud.replace(/\/+$/, "") !== this.base) {
      throw new AgentError(
        "wrong-audience",
        `The server at ${this.base} calls itself ${challenge.aud}: use that address for it (forget this identity and add it again).`,
      );
    }
    const signature = await sign(key, challengeMessage(challenge.aud, challenge.nonce));
    try {
      return await this.call("POST", "/auth/response", {
        // session: false: an access token only, no refresh session (the key is the agent's
        // lasting credential, so nothing is left in the person's Sessions).
        body: { did, nonce: challenge.nonce, signature: b64url(signature), session: false },
      });
    } catch (error) {
      if (error.status === 401) {
        throw new AgentError(
          "key-rejected",
          `${this.base} no longer accepts this device's key for this identity (its key was replaced, or the identity was deleted). Forget it here and add it again with your password.`,
        );
      }
      throw error;
    }
  }

  /** POST /agent/grants: {grant, created, tokens}. */
  mintGrant(token, origin, scopes, name) {
    return this.call("POST", "/agent/grants", { token, body: { origin, scopes, name } });
  }

  /**
   * POST /agent/grants/{gid}/tokens for ``origin`` (the server answers 404 unless the grant
   * is that origin's); null when the grant is gone (revoked) or is another origin's.
   */
  async grantTokens(token, gid, origin, scopes) {
    let answer;
    try {
      answer = await this.call("POST", `/agent/grants/${encodeURIComponent(gid)}/tokens`, {
        token,
        body: { origin, scopes },
      });
    } catch (error) {
      if (error.status === 404) return null;
      throw error;
    }
    if (!answer || !answer.grant || answer.grant.origin !== origin) return null;
    return answer;
  }

  /** Rotate an app refresh token at /auth/token; null when the grant or session is gone. */
  async refresh(origin, refreshToken) {
    try {
      return await this.call("POST", "/auth/token", {
        form: { grant_type: "refresh_token", refresh_token: refreshToken, client_id: origin },
      });
    } catch (error) {
      if (error.status === 400 || error.status === 401) return null;
      throw error;
    }
  }

  /** End an app session (RFC 7009); best effort. */
  async revoke(origin, refreshToken) {
    try {
      await this.call("POST", "/auth/revoke", { form: { token: refreshToken, client_id: origin } });
    } catch {
      // Offline: the token is forgotten here anyway and expires on its own.
    }
  }
}

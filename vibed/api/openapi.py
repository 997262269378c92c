"""The OpenAPI 3.1 document served at ``/openapi.json``; a test keeps it and the routes equal."""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


_BAD = {
    "400": _problem("Malformed or invalid input"),
    "413": _problem("Body larger than 64 KiB"),
    "415": _problem("Body is not application/json"),
}
_COOKIE = {
    "Set-Cookie": {
        "description": "vibe_refresh: httpOnly, SameSite=Strict, Path=/auth",
        "schema": {"type": "string"},
    }
}


def openapi_document(
    public_url: str,
    *,
    blob_mime_types: tuple[str, ...] = (),
    blob_max_size: int | None = None,
) -> dict[str, Any]:
    """The whole document: this module's paths plus each surface's OPENAPI_PATHS, with this
    server's blob limits (allowed types, largest size) where the schemas need them."""
    import copy

    doc = _core_document(public_url)
    from agent_bridge import api as agent

    from . import apps, blob, data, me, site

    for surface in (data, blob, apps, agent, me, site):
        doc["paths"].update(copy.deepcopy(surface.OPENAPI_PATHS))
        doc["components"]["schemas"].update(copy.deepcopy(surface.OPENAPI_SCHEMAS))
    upload = doc["components"]["schemas"]["UploadRequest"]["properties"]
    if blob_mime_types:
        exact = [m for m in blob_mime_types if not m.endswith("/*")]
        wildcards = [m[:-2] for m in blob_mime_types if m.endswith("/*")]
        choices: list[dict[str, Any]] = [{"enum": exact}] if exact else []
        choices += [
            {"pattern": f"^{prefix}/[a-z0-9][a-z0-9!#$&^_.+-]{{0,126}}$"} for prefix in wildcards
        ]
        upload["mime"] = {"type": "string", "anyOf": choices, "examples": ["image/png"]}
    if blob_max_size is not None:
        upload["size"]["maximum"] = blob_max_size
    return doc


def _core_document(public_url: str) -> dict[str, Any]:
    credentials = {
        "required": True,
        "content": {"application/json": {"schema": _ref("Credentials")}},
    }
    logged_in = {
        "description": "Logged in",
        "headers": _COOKIE,
        "content": {"application/json": {"schema": _ref("LoginResult")}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Vibe Cloud API (vibed)",
            "version": "0.1.0",
            "description": "Identities, their data and files. Errors are RFC 9457 "
            "application/problem+json.",
        },
        "servers": [{"url": public_url}],
        "paths": {
            "/": {
                "get": {
                    "summary": "Landing page: what this server is; sign up, log in",
                    "security": [],
                    "responses": {
                        "200": {"description": "HTML page", "content": {"text/html": {}}}
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "The process answers",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "Alive")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "CouchDB reachable and bootstrapped",
                    "security": [],
                    "responses": {
                        "200": _json({"type": "object"}, "Ready"),
                        "503": _problem("Not ready, with the reason"),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1"}},
                }
            },
            "/.well-known/jwks.json": {
                "get": {
                    "summary": "Public keys verifying access tokens (EdDSA)",
                    "security": [],
                    "responses": {"200": _json(_ref("JWKS"), "JWK set")},
                }
            },
            "/auth/signup": {
                "post": {
                    "summary": "Create an identity",
                    "security": [],
                    "requestBody": credentials,
                    "responses": {
                        "201": {**logged_in, "description": "Created and logged in"},
                        "409": _problem("Email already taken"),
                        "429": _problem("Too many signups from this address; see Retry-After"),
                        "503": _problem("Database unavailable"),
                        **_BAD,
                    },
                }
            },
            "/auth/login": {
                "post": {
                    "summary": "Log in with email and password",
                    "security": [],
                    "requestBody": credentials,
                    "responses": {
                        "200": logged_in,
                        "401": _problem("Unknown email or wrong password (same answer)"),
                        "429": _problem("Too many failures; see Retry-After"),
                        "503": _problem("Database unavailable"),
                        **_BAD,
                    },
                }
            },
            "/auth/refresh": {
                "post": {
                    "summary": "Rotate the refresh cookie for a new access token",
                    "security": [],
                    "parameters": [
                        {
                            "name": "vibe_refresh",
                            "in": "cookie",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "New tokens",
                            "headers": _COOKIE,
                            "content": {"application/json": {"schema": _ref("Tokens")}},
                        },
                        "401": _problem("Session ended; log in again"),
                        "503": _problem("Database unavailable"),
                    },
                }
            },
            "/auth/logout": {
                "post": {
                    "summary": "Revoke the refresh token family and clear the cookie",
                    "description": "Without the cookie, a first-party access token "
                    "(Authorization: Bearer) ends its own session instead.",
                    "security": [{}, {"bearer": []}],
                    "responses": {
                        "204": {"description": "Logged out"},
                        "401": _problem("A bearer token that is invalid, expired or revoked"),
                        "403": _problem("An app's token: apps end their session at /auth/revoke"),
                        "503": _problem("Database unavailable: the session is not ended yet"),
                    },
                }
            },
            "/auth/challenge": {
                "get": {
                    "summary": "A single-use nonce for the agent's DID login",
                    "security": [],
                    "responses": {
                        "200": _json(_ref("Challenge"), "Nonce, audience, expiry"),
                        "429": _problem("Too many challenges from this address"),
                        "503": _problem("Database unavailable"),
                    },
                }
            },
            "/auth/response": {
                "post": {
                    "summary": "Answer a challenge with an Ed25519 signature",
                    "description": "Sign the UTF-8 bytes of "
                    "'vibe-auth-v1\\naud:<aud>\\nnonce:<nonce>'.",
                    "security": [],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("ChallengeResponse")}},
                    },
                    "responses": {
                        "200": logged_in,
                        "401": _problem("Nonce unknown, used, expired or bad signature"),
                        "429": _problem("Too many failures"),
                        "503": _problem("Database unavailable"),
                        **_BAD,
                    },
                }
            },
            "/realtime": {
                "get": {
                    "summary": "WebSocket upgrade: the realtime change feed (see docs/realtime.md)",
                    "description": "The access token comes after the upgrade (an auth "
                    "message) or as ?access_token=; a plain GET is answered 426.",
                    "security": [],
                    "responses": {
                        "101": {"description": "Switching protocols"},
                        "426": _problem("Not a WebSocket handshake"),
                        "503": _problem("Shutting down, or too many sockets waiting for a token"),
                    },
                }
            },
            "/me": {
                "get": {
                    "summary": "The caller's identity (redacted)",
                    "responses": {
                        "200": _json(
                            _ref("Identity"),
                            "Identity (an app's token sees id, did and publicKey only)",
                        ),
                        "401": _problem("Missing, invalid, expired or revoked access token"),
                        "403": _problem("The token carries no scope"),
                        "404": _problem("The identity no longer exists"),
                        "503": _problem("Tokens or the database cannot be checked right now"),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (EdDSA)"}
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                },
                "Credentials": {
                    "type": "object",
                    "required": ["email", "password"],
                    "additionalProperties": True,
                    "properties": {
                        "email": {"type": "string", "format": "email", "maxLength": 254},
                        "password": {"type": "string", "minLength": 8, "maxLength": 1024},
                    },
                },
                "Identity": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "pattern": "^idn:"},
                        "email": {"type": "string"},
                        "publicKey": {"type": "string", "description": "base64 Ed25519"},
                        "did": {"type": "string"},
                        "createdAt": {"type": "string", "format": "date-time"},
                    },
                },
                "Tokens": {
                    "type": "object",
                    "properties": {
                        "accessToken": {"type": "string"},
                        "tokenType": {"const": "Bearer"},
                        "expiresIn": {"type": "integer"},
                        "expiresAt": {"type": "integer"},
                    },
                },
                "LoginResult": {
                    "allOf": [
                        _ref("Tokens"),
                        {"type": "object", "properties": {"identity": _ref("Identity")}},
                    ]
                },
                "Challenge": {
                    "type": "object",
                    "properties": {
                        "nonce": {"type": "string"},
                        "aud": {"type": "string"},
                        "expiresAt": {"type": "integer"},
                    },
                },
                "ChallengeResponse": {
                    "type": "object",
                    "required": ["did", "nonce", "signature"],
                    "properties": {
                        "did": {
                            "type": "string",
                            "pattern": "^did:key:z[1-9A-HJ-NP-Za-km-z]{46,48}$",
                            "maxLength": 200,
                        },
                        "nonce": {"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$"},
                        "signature": {
                            "type": "string",
                            "description": "base64url of the 64-byte Ed25519 signature",
                            "pattern": "^[A-Za-z0-9_-]{86}={0,2}$",
                        },
                        "session": {
                            "type": "boolean",
                            "default": True,
                            "description": "false: an access token only, no refresh session "
                            "and no cookie (the agent, which holds a key, not a session)",
                        },
                    },
                },
                "JWKS": {"type": "object", "properties": {"keys": {"type": "array"}}},
            },
        },
        "security": [{"bearer": []}],
    }

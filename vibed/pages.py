"""Server-rendered pages of the authorization flow: log in, create an account, consent, and
the page a person sees when an app's request cannot be trusted.

No framework and no script: semantic HTML forms POSTed back to the daemon, every piece of
text from a request or a database escaped, one stylesheet from ``/static/``. Every page is
sent with a strict Content-Security-Policy (no scripts at all, ``frame-ancestors 'none'``),
``X-Frame-Options: DENY`` (the consent page must never be framed: clickjacking),
``Referrer-Policy: same-origin`` (under ``no-referrer`` a form POST would carry
``Origin: null``, which the forms' same-origin check refuses) and ``Cache-Control: no-store``.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape

from twisted.web.iweb import IRequest

from vibed.oauth import AuthorizationRequest, describe_scopes


def page_headers(
    request: IRequest,
    form_targets: Iterable[str] = (),
    *,
    scripts: bool = False,
    connect: Iterable[str] = (),
    referrer: bytes = b"same-origin",
) -> None:
    """The security headers of an HTML page; ``form_targets``: origins a form on it may end
    up at (the consent form redirects to the app, and CSP's form-action covers redirects).
    ``scripts``: the page loads module scripts from this origin (never inline ones);
    ``connect``: origins its scripts may fetch from besides its own (a WebSocket, S3).
    ``referrer``: ``same-origin`` for pages with forms (a form POST under ``no-referrer``
    carries ``Origin: null``, which the forms' check refuses), ``no-referrer`` otherwise."""
    targets = " ".join(["'self'", *form_targets])
    csp = "default-src 'none'; style-src 'self'; img-src 'self'; "
    if scripts:
        csp += "script-src 'self'; " + "connect-src " + " ".join(["'self'", *connect]) + "; "
    csp += f"form-action {targets}; frame-ancestors 'none'; base-uri 'none'"
    request.setHeader(b"Content-Security-Policy", csp.encode("ascii"))
    request.setHeader(b"X-Frame-Options", b"DENY")
    request.setHeader(b"Referrer-Policy", referrer)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")


def _page(title: str, body: str) -> bytes:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · Vibe Cloud</title>"
        '<link rel="stylesheet" href="/static/vibe.css"></head>\n'
        '<body><main><p class="brand"><a href="/">Vibe Cloud</a></p>\n'
        f"{body}\n</main></body></html>\n"
    ).encode()


def _hidden(fields: dict[str, str]) -> str:
    return "".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in fields.items()
    )


def render(
    request: IRequest,
    title: str,
    body: str,
    status: int = 200,
    form_targets: Iterable[str] = (),
    referrer: bytes = b"same-origin",
) -> bytes:
    request.setResponseCode(status)
    page_headers(request, form_targets, referrer=referrer)
    return _page(title, body)


def message_page(request: IRequest, title: str, message: str, status: int = 400) -> bytes:
    """A page that says what went wrong, in words a person can act on."""
    body = f"<h1>{escape(title)}</h1><p>{escape(message)}</p>"
    return render(request, title, body, status)


def wants_html(request: IRequest) -> bool:
    """Whether ``request`` is a browser navigation (it asks for HTML by name): it gets pages,
    where API clients (``*/*``, JSON) get problem+json."""
    accept = (request.getHeader(b"accept") or b"").lower()
    return request.method in (b"GET", b"HEAD") and b"text/html" in accept


def not_found_page(request: IRequest) -> bytes:
    """The 404 a person sees for an address where nothing is."""
    body = (
        "<h1>Nothing here</h1>"
        "<p>There is no page at this address. It may have moved, or the link may be "
        "mistyped.</p>"
        '<div class="actions"><a class="button primary" href="/dashboard">Your dashboard</a>'
        '<a class="button" href="/">Home page</a></div>'
        '<p class="note">Building an app? The API is described at '
        '<a href="/openapi.json">/openapi.json</a>.</p>'
    )
    return render(request, "Page not found", body, 404, referrer=b"no-referrer")


def login_page(
    request: IRequest,
    *,
    csrf: str,
    next_url: str,
    email: str = "",
    error: str | None = None,
    status: int = 200,
    signup: bool = False,
) -> bytes:
    """The log-in (or create-an-account) form; it POSTs to itself and goes on to ``next``."""
    action = "/signup" if signup else "/login"
    title = "Create your account" if signup else "Log in"
    other = (
        f'<p class="note">Already have an account? <a href="/login?next={escape(_q(next_url))}">'
        "Log in</a>.</p>"
        if signup
        else f'<p class="note">New here? <a href="/signup?next={escape(_q(next_url))}">'
        "Create your account</a>.</p>"
    )
    problem = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    password_hint = (
        '<p class="note" id="password-rules">At least 8 characters (a few unrelated words make '
        "a strong one). It also locks your personal key: nobody, not even this server, can "
        "recover it without your password.</p>"
        if signup
        else ""
    )
    described = ' aria-describedby="password-rules"' if signup else ""
    autocomplete = "new-password" if signup else "current-password"
    body = (
        f"<h1>{title}</h1>{problem}"
        f'<form method="post" action="{action}">'
        + _hidden({"csrf": csrf, "next": next_url})
        + '<label for="email">Email</label>'
        f'<input id="email" name="email" type="email" required autocomplete="email" '
        f'value="{escape(email)}">'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password" required '
        f'minlength="{8 if signup else 1}" maxlength="1024"{described} '
        f'autocomplete="{autocomplete}">'
        + password_hint
        + f'<div class="actions"><button class="primary" type="submit">{title}</button></div>'
        "</form>" + other
    )
    return render(request, title, body, status)


def _q(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def consent_page(
    request: IRequest,
    *,
    auth: AuthorizationRequest,
    csrf: str,
    email: str,
    switch_url: str,
) -> bytes:
    """Ask the person whether ``auth.client_id`` may have ``auth.scopes``."""
    lines = []
    implies_read = False
    for sentence, collection in describe_scopes(auth.scopes):
        if collection is None:
            lines.append(f"<li>{escape(sentence)}</li>")
        else:
            lines.append(f"<li>{escape(sentence)} <strong>{escape(collection)}</strong></li>")
            implies_read = implies_read or sentence.startswith("Read and change")
    name = (
        f'<p class="untrusted">It calls itself “{escape(auth.client_name)}”. The app chose that '
        "name itself; only the address above is checked.</p>"
        if auth.client_name
        else ""
    )
    note = (
        '<p class="note">Changing a collection includes reading it and deleting from it.</p>'
        if implies_read
        else ""
    )
    body = (
        "<h1>Allow this app to use your data?</h1>"
        "<p>The app at</p>"
        f'<strong class="origin" id="origin">{escape(auth.client_id)}</strong>'
        f"{name}"
        "<p>wants to:</p>"
        f'<ul class="scopes" id="scopes">{"".join(lines)}</ul>{note}'
        f'<form method="post" action="/auth/authorize">'
        + _hidden({**auth.params(), "csrf": csrf})
        + '<div class="actions">'
        '<button class="primary" type="submit" name="decision" value="allow" id="allow">'
        "Allow</button>"
        '<button type="submit" name="decision" value="deny" id="deny">Deny</button>'
        "</div></form>"
        f'<p class="note">Signed in as <strong>{escape(email)}</strong>. '
        f'<a href="{escape(switch_url)}">Use another account</a>.</p>'
        '<p class="note">You can take this access back at any time; the app then loses it '
        "within seconds.</p>"
    )
    return render(request, "Allow access", body, form_targets=[auth.client_id])

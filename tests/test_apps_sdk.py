"""The browser SDK and React hooks as packages (issue 8, section 4): served by the daemon at a
stable path, packable with npm, and their hand-written declarations checked by tsc."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from harness import Vibed, VibedFactory

ROOT = Path(__file__).resolve().parent.parent
TSC = ROOT / "node_modules" / ".bin" / "tsc"


def need(tool: Path | str) -> str:
    path = str(tool) if Path(tool).exists() else shutil.which(str(tool))
    if not path:
        pytest.skip(f"{tool} is missing: npm ci (make install does)")
    return path


@pytest_twisted.async_yield_fixture
async def vibed(make_vibed: VibedFactory) -> AsyncIterator[Vibed]:
    yield await make_vibed()


@pytest_twisted.ensureDeferred
async def test_daemon_serves_the_sdk_at_a_stable_path(vibed: Vibed) -> None:
    """GET /sdk/vibe.js (and the modules it imports, and the hooks under /sdk/react/) answer
    JavaScript that any origin may import, with an ETag that turns a repeat into a 304;
    anything else under /sdk is 404."""
    sdk = await vibed.request("GET", "/sdk/vibe.js", headers={"Origin": "https://notes.example"})
    assert sdk.code == 200
    assert sdk.header("content-type") == "text/javascript; charset=utf-8"
    assert sdk.header("access-control-allow-origin") == "*"
    assert sdk.header("x-content-type-options") == "nosniff"
    assert b"export function createVibe" in sdk.content
    for module in re.findall(rb'from "\./([a-z]+\.js)"', sdk.content):
        imported = await vibed.request("GET", "/sdk/" + module.decode())
        assert imported.code == 200, module
    etag = sdk.header("etag")
    assert etag
    again = await vibed.request("GET", "/sdk/vibe.js", headers={"If-None-Match": etag})
    assert again.code == 304 and again.content == b""
    hooks = await vibed.request("GET", "/sdk/react/index.js")
    assert hooks.code == 200 and b"useCollection" in hooks.content
    types = await vibed.request("GET", "/sdk/vibe.d.ts")
    assert types.code == 200
    for path in ("/sdk/nope.js", "/sdk/../vibed/tokens.py", "/sdk/%2e%2e/pyproject.toml"):
        assert (await vibed.request("GET", path)).code == 404, path
    css = await vibed.request("GET", "/static/vibe.css")
    assert css.code == 200 and css.header("content-type") == "text/css; charset=utf-8"


def test_declarations_pass_tsc() -> None:
    """tsc --noEmit accepts web/sdk/vibe.d.ts and web/react/index.d.ts against example code
    that uses every export."""
    tsc = need(TSC)
    result = subprocess.run(
        [tsc, "-p", "web/typecheck"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_tsc_catches_a_wrong_use(tmp_path: Path) -> None:
    """The check has teeth: code that misuses the SDK's types (a scope that does not exist, a
    number as a collection name) fails tsc."""
    tsc = need(TSC)
    config = json.loads((ROOT / "web" / "typecheck" / "tsconfig.json").read_text())
    base = ROOT / "web" / "typecheck"
    options = config["compilerOptions"]
    options["baseUrl"] = str(base)
    options["typeRoots"] = [str(ROOT / "node_modules" / "@types")]
    wrong = tmp_path / "wrong.ts"
    wrong.write_text(
        'import { createVibe } from "vibe-sdk";\n'
        'const vibe = createVibe({ server: "x", scopes: ["data:delete:notes"] });\n'
        "vibe.collection(42);\n"
    )
    config["files"] = [str(wrong)]
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    result = subprocess.run(
        [tsc, "-p", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "wrong.ts(2," in result.stdout and "data:delete" in result.stdout  # the scope
    assert "wrong.ts(3," in result.stdout and "'number'" in result.stdout  # the name


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("sdk", {"vibe.js", "vibe.d.ts", "errors.js", "realtime.js", "stores.js", "package.json"}),
        ("react", {"index.js", "index.d.ts", "package.json"}),
    ],
)
def test_npm_pack(folder: str, expected: set[str], tmp_path: Path) -> None:
    """`npm pack` makes a tarball of each package with its modules, declarations and README,
    and every module the entry point imports is in it."""
    npm = need("npm")
    result = subprocess.run(
        [npm, "pack", "--json", "--pack-destination", str(tmp_path)],
        cwd=ROOT / "web" / folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (packed,) = json.loads(result.stdout)
    files = {f["path"] for f in packed["files"]}
    assert expected | {"README.md"} <= files, files
    assert (tmp_path / packed["filename"]).exists()
    entry = (ROOT / "web" / folder / ("vibe.js" if folder == "sdk" else "index.js")).read_text()
    for module in re.findall(r'from "\./([a-z]+\.js)"', entry):
        assert module in files

"""Build the vibe agent: the unpacked extension and a zip of it (``make agent``).

``python -m agent_bridge.build [--out build/agent]`` copies ``agent_bridge/extension/`` and,
into ``vendor/noble-hashes/``, the ES modules of the pinned ``@noble/hashes`` that scrypt
needs (found by following their imports from ``node_modules``, so nothing else ships), then
writes ``vibe-agent-<version>.zip`` with the same files (sorted, fixed timestamps: the same
sources give the same bytes). No bundler, no remote code: what is loaded is what is here.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "extension"
ROOT = HERE.parent
VENDOR = "vendor/noble-hashes"
ENTRY = "scrypt.js"
_IMPORT = re.compile(r"""(?:^|\s)(?:import|export)\b[^'"]*?from\s*['"](\./[^'"]+)['"]""", re.M)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class BuildError(Exception):
    """Something a person must fix before the agent can be built (said in one line)."""


def noble_dir(root: Path = ROOT) -> Path:
    found = root / "node_modules" / "@noble" / "hashes"
    if not (found / ENTRY).is_file():
        raise BuildError(
            f"{found} is missing: run `make install` (npm ci installs the pinned @noble/hashes)"
        )
    return found


def module_closure(directory: Path, entry: str) -> list[str]:
    """``entry`` and every module it imports, relative to ``directory``, transitively."""
    seen: list[str] = []
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        text = (directory / name).read_text(encoding="utf-8")
        for target in _IMPORT.findall(text):
            resolved = (Path(name).parent / target).as_posix().removeprefix("./")
            todo.append(resolved)
    return sorted(seen)


def build(out: Path, root: Path = ROOT) -> tuple[Path, Path]:
    """The unpacked extension directory and the zip, under ``out``."""
    manifest = json.loads((SOURCE / "manifest.json").read_text(encoding="utf-8"))
    version = manifest["version"]
    unpacked = out / "vibe-agent"
    if unpacked.exists():
        shutil.rmtree(unpacked)
    shutil.copytree(SOURCE, unpacked, ignore=shutil.ignore_patterns("*.md", ".*"))
    noble = noble_dir(root)
    vendor = unpacked / VENDOR
    vendor.mkdir(parents=True)
    for name in module_closure(noble, ENTRY):
        (vendor / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(noble / name, vendor / name)
    shutil.copyfile(noble / "LICENSE", vendor / "LICENSE")
    noble_version = json.loads((noble / "package.json").read_text())["version"]
    (vendor / "VERSION").write_text(f"@noble/hashes {noble_version}\n")
    archive = out / f"vibe-agent-{version}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in unpacked.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(unpacked).as_posix(), _ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    return unpacked, archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "agent")
    args = parser.parse_args(argv)
    try:
        unpacked, archive = build(args.out)
    except BuildError as e:
        print(f"make agent: {e}", file=sys.stderr)
        return 1
    print(f"make agent: {unpacked} (load unpacked) and {archive}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""NiiVue, the WebGL2 volume viewer of the review page, provisioned offline like the ResNet weights.

`provision()` (behind `make viewer`, `python -m pipeline viewer`) takes the npm package
`@niivue/niivue@0.69.0` (BSD-2-Clause) with `npm pack` (or a local `--tarball`), checks the
tarball against the sha512 integrity and sha1 the npm registry publishes for that version
(pinned below), extracts only `package/dist/niivue.umd.js` (a classic script, so a page opened
from file:// can load it with `<script src>`), checks its sha256, and writes it with the
licence and a provenance JSON into `third_party/niivue/` (git-ignored; `$LGG_NIIVUE_DIR`
elsewhere). The tarball ships no LICENSE file, only `"license": "BSD-2-Clause"` in its
package.json, so the licence text of the upstream repository (github.com/niivue/niivue) is
pinned here and written beside the script.

`copy_into(out_dir)` copies the verified script once into a diagnosis folder; nothing is ever
fetched when a page opens. Without it the page works without its 3D views and says how to
enable them (`MAKE_COMMAND`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import DataError
from pipeline.io_utils import atomic_write_bytes, atomic_write_json
from pipeline.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

NPM_PACKAGE = "@niivue/niivue@0.69.0"
VERSION = "0.69.0"
TARBALL_NAME = "niivue-niivue-0.69.0.tgz"
# `npm view @niivue/niivue@0.69.0 dist`: the registry's integrity (sha512) and shasum (sha1)
TARBALL_SHA512 = "YMjQvJgD1W2b7DuoxkwlC4VxbrgIePRJ5qyQzXKxi2v2MBVg285P/CIQyg46oDDGDIcaNlbd+MhtO/edMbXJkA=="
TARBALL_SHA1 = "c097825978aadaf498e9aab9d1f92ebf552eaf37"
SCRIPT_MEMBER = "package/dist/niivue.umd.js"
SCRIPT_NAME = "niivue.umd.js"
SCRIPT_SHA256 = "47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af"
LICENSE_NAME = "niivue-LICENSE"
SOURCE_NAME = "niivue.source.json"
DIR_ENV = "LGG_NIIVUE_DIR"
DEFAULT_DIR = PROJECT_ROOT / "third_party" / "niivue"
MAKE_COMMAND = "make viewer"

LICENSE_TEXT = """\
NiiVue (@niivue/niivue 0.69.0, https://github.com/niivue/niivue): BSD-2-Clause

BSD 2-Clause License

Copyright (c) 2021, Niivue
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


class ViewerMissing(FileNotFoundError):
    """NiiVue cannot be provisioned (no npm, no registry, no tarball)."""


def asset_dir() -> Path:
    """Where the provisioned script lives: `$LGG_NIIVUE_DIR`, else `third_party/niivue/`."""
    env = os.environ.get(DIR_ENV)
    return Path(env).expanduser() if env else DEFAULT_DIR


def _digest(path: Path, name: str) -> bytes:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, name).digest()


def verify_tarball(path: str | os.PathLike) -> None:
    """DataError naming `path` unless its sha512 and sha1 are the registry's for NPM_PACKAGE."""
    path = Path(path)
    sha512 = base64.b64encode(_digest(path, "sha512")).decode()
    sha1 = _digest(path, "sha1").hex()
    if sha512 != TARBALL_SHA512 or sha1 != TARBALL_SHA1:
        raise DataError(
            f"checksum mismatch for the {NPM_PACKAGE} tarball: sha512-{sha512}, sha1 {sha1}; "
            f"expected sha512-{TARBALL_SHA512}, sha1 {TARBALL_SHA1}",
            files=[path],
        )


def script_path() -> Path | None:
    """The provisioned niivue.umd.js when present and its sha256 is the pinned one, else None."""
    path = asset_dir() / SCRIPT_NAME
    if not path.is_file():
        return None
    if _digest(path, "sha256").hex() != SCRIPT_SHA256:
        log.warning(
            "%s is not the pinned NiiVue %s (sha256 differs); run `%s --force`", path, VERSION, MAKE_COMMAND
        )
        return None
    return path


def npm_pack(dest_dir: Path) -> Path:
    """`npm pack NPM_PACKAGE` into `dest_dir` (needs npm and the registry) -> the tarball."""
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerMissing(
            f"`npm` is not installed, so {NPM_PACKAGE} cannot be fetched; install npm or "
            "pass the tarball with `python -m pipeline viewer --tarball PATH`"
        )
    result = subprocess.run(
        [npm, "pack", NPM_PACKAGE, "--pack-destination", str(dest_dir)],
        cwd=dest_dir,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    tarballs = sorted(dest_dir.glob("*.tgz"))
    if result.returncode != 0 or len(tarballs) != 1:
        raise ViewerMissing(
            f"`npm pack {NPM_PACKAGE}` failed (exit {result.returncode}):\n"
            f"{result.stderr.strip()}\nPass a downloaded tarball with --tarball PATH."
        )
    return tarballs[0]


def provision(tarball: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> Path:
    """Fetch (or take `tarball`), verify and install niivue.umd.js into `out_dir` (default `asset_dir()`).

    The tarball's checksums are checked before anything is extracted, and only the one script
    member is read (no paths from the archive are used). Returns the script's path.
    """
    out_dir = Path(out_dir) if out_dir else asset_dir()
    with tempfile.TemporaryDirectory(prefix="niivue.") as tmp:
        if tarball is None:
            tarball = npm_pack(Path(tmp))
            log.info("fetched %s with npm pack: %s", NPM_PACKAGE, tarball)
        tarball = Path(tarball)
        if not tarball.is_file():
            raise ViewerMissing(f"tarball not found: {tarball}")
        verify_tarball(tarball)
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                member = tar.getmember(SCRIPT_MEMBER)
                fh = tar.extractfile(member) if member.isfile() else None
                data = fh.read() if fh is not None else b""
        except (KeyError, tarfile.TarError, OSError) as exc:
            raise DataError(
                f"cannot read {SCRIPT_MEMBER} from the {NPM_PACKAGE} tarball ({exc})", files=[tarball]
            ) from exc
    if hashlib.sha256(data).hexdigest() != SCRIPT_SHA256:
        raise DataError(
            f"{SCRIPT_MEMBER} in the tarball is not the pinned file (sha256 differs)", files=[tarball]
        )
    atomic_write_bytes(out_dir / SCRIPT_NAME, data)
    atomic_write_bytes(out_dir / LICENSE_NAME, LICENSE_TEXT.encode())
    atomic_write_json(
        out_dir / SOURCE_NAME,
        {
            "package": NPM_PACKAGE,
            "file": SCRIPT_MEMBER,
            "tarball_sha512": TARBALL_SHA512,
            "tarball_sha1": TARBALL_SHA1,
            "script_sha256": SCRIPT_SHA256,
            "license": f"BSD-2-Clause (see {LICENSE_NAME})",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return out_dir / SCRIPT_NAME


def copy_into(folder: str | os.PathLike) -> Path | None:
    """Copy the provisioned script and its licence into `folder` once (kept when already identical).

    Returns the copy's path, or None when NiiVue is not provisioned (the page then has no 3D view).
    """
    source = script_path()
    if source is None:
        return None
    folder = Path(folder)
    target = folder / SCRIPT_NAME
    if not (
        target.is_file()
        and target.stat().st_size == source.stat().st_size
        and _digest(target, "sha256").hex() == SCRIPT_SHA256
    ):
        atomic_write_bytes(target, source.read_bytes())
    licence = folder / LICENSE_NAME
    if not licence.is_file():
        atomic_write_bytes(licence, LICENSE_TEXT.encode())
    return target

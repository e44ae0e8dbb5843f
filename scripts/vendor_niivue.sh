#!/usr/bin/env bash
# Vendor NiiVue's self-contained browser bundle into service/static/vendor/ so the web page works
# offline (no CDN).  Needs npm and the npm registry; run from anywhere:
#   scripts/vendor_niivue.sh [VERSION]
# Only the UMD build (dist/niivue.umd.js: NiiVue with its dependencies bundled, no further imports,
# no network fetches) is kept, plus the licences and a VERSION file recording what was vendored.
set -euo pipefail

VERSION="${1:-0.69.0}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/service/static/vendor/niivue"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

cd "$WORK"
# The package tarball, exactly as published, and its recorded integrity hash.
npm pack --silent "@niivue/niivue@$VERSION" >/dev/null
TARBALL="niivue-niivue-$VERSION.tgz"
INTEGRITY="$(npm view "@niivue/niivue@$VERSION" dist.integrity)"
tar xzf "$TARBALL"
test -f package/dist/niivue.umd.js || { echo "package/dist/niivue.umd.js missing in $TARBALL" >&2; exit 1; }
LICENSE_ID="$(node -p "require('./package/package.json').license")"
test "$LICENSE_ID" = "BSD-2-Clause" || { echo "licence changed to $LICENSE_ID: review before vendoring" >&2; exit 1; }

# The licences of the dependencies the bundle contains (resolved from the package's own ranges).
mkdir deps && cd deps
npm init -y >/dev/null
npm install --silent --no-save --ignore-scripts --no-audit --no-fund "@niivue/niivue@$VERSION" >/dev/null
cd ..

rm -rf "$DEST"
mkdir -p "$DEST"
cp package/dist/niivue.umd.js "$DEST/niivue.umd.js"

# The npm tarball ships no LICENSE file; package.json declares BSD-2-Clause, and this is the text
# of the LICENSE file in github.com/niivue/niivue.
cat >"$DEST/LICENSE" <<'LICENSE_TEXT'
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
LICENSE_TEXT

# Third-party licences: every installed dependency package that ships a licence file.
{
  echo "Licences of the packages bundled into niivue.umd.js (as resolved by npm when vendored)."
  for dir in $(cd deps && npm ls --all --parseable --omit=dev 2>/dev/null | sort -u); do
    case "$dir" in */node_modules/*) ;; *) continue ;; esac  # the throw-away project itself
    case "$dir" in */@niivue/niivue) continue ;; esac  # NiiVue's own licence is LICENSE
    lic="$(find "$dir" -maxdepth 1 -iname 'licen[cs]e*' | sort | head -n1)"
    [ -n "$lic" ] || continue
    name="$(node -e 'const p=JSON.parse(require("fs").readFileSync(process.argv[1])); console.log(`${p.name}@${p.version} (${p.license || "?"})`)' "$dir/package.json")"
    printf '\n==== %s ====\n\n' "$name"
    cat "$lic"
  done
} >"$DEST/THIRD_PARTY_LICENSES"

SHA="$(sha256sum "$DEST/niivue.umd.js" | cut -d' ' -f1)"
cat >"$DEST/VERSION" <<INFO
@niivue/niivue $VERSION (npm registry, $TARBALL, $INTEGRITY)
file: dist/niivue.umd.js -> niivue.umd.js (UMD, global "niivue"), sha256 $SHA
vendored with scripts/vendor_niivue.sh
INFO
echo "vendored @niivue/niivue $VERSION into $DEST:"
ls -l "$DEST"

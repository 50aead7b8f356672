#!/usr/bin/env bash
# Fetches two photographs (a cat and an espresso cup) that the pretrained-weights test
# classifies. They ship inside the scikit-image wheel, a registry package, so this needs
# only pip. Usage: scripts/fetch-test-photos.sh [DEST] (default .cache/test-photos).
set -euo pipefail
dest=${1:-"$(dirname "$0")/../.cache/test-photos"}
mkdir -p "$dest"
if [ -s "$dest/chelsea.png" ] && [ -s "$dest/coffee.png" ]; then
  echo "test photos already in $dest"; exit 0
fi
python=${INSP_PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$python" -m pip download --quiet --no-deps --only-binary=:all: scikit-image==0.24.0 -d "$scratch"
"$python" - "$scratch" "$dest" <<'PY'
import glob, sys, zipfile
scratch, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(scratch + "/scikit_image-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in ("chelsea.png", "coffee.png"):
        with open(f"{dest}/{name}", "wb") as f:
            f.write(z.read(f"skimage/data/{name}"))
PY
echo "test photos written to $dest"

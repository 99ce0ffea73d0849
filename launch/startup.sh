#!/bin/bash
# TPU VM startup script (installed by `launch/tpu.py create`; rerun on a live slice with `launch/tpu.py setup`).
#
# Runs as root on every worker at every boot. It installs the pinned environment the training runs in:
#   /opt/hapvr/code   the code, from the VM metadata key hapvr-repo: a gs://....tar.gz (`launch/tpu.py push`)
#                     or a git URL (with hapvr-ref: branch, tag or commit)
#   /opt/hapvr/venv   a venv of hapvr-python (default python3.11) with requirements.txt's pins, the jax line
#                     replaced by jax[tpu] at the same version, as requirements.txt's header says
#   gcsfuse           so `launch/tpu.py run` can mount gs:// buckets under /mnt/gcs
#   /opt/hapvr/ready  written last; `launch/tpu.py run` refuses to start without it
# Output goes to the serial console and the journal: sudo journalctl -u google-startup-scripts
set -euo pipefail

ROOT=/opt/hapvr
META=http://metadata.google.internal/computeMetadata/v1/instance/attributes
meta() { curl -fsS -H 'Metadata-Flavor: Google' "$META/$1" 2>/dev/null || true; }

REPO="$(meta hapvr-repo)"
REF="$(meta hapvr-ref)"
PY="$(meta hapvr-python)"
PY="${PY:-python3.11}"
if [ -z "$REPO" ]; then
  echo "hapvr startup: no hapvr-repo metadata; nothing to install" >&2
  exit 1
fi

mkdir -p "$ROOT"
rm -f "$ROOT/ready"
echo "hapvr startup: repo=$REPO ref=${REF:-<default>} python=$PY"

# System packages: the interpreter, git, and gcsfuse from Google's apt repository.
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "$PY" "$PY-venv" git curl ca-certificates lsb-release
if ! command -v gcsfuse >/dev/null; then
  curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg -o /usr/share/keyrings/cloud.google.asc
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt" \
       "gcsfuse-$(lsb_release -c -s) main" > /etc/apt/sources.list.d/gcsfuse.list
  apt-get update -q
  apt-get install -y -q gcsfuse
fi
mkdir -p /mnt/gcs && chmod 1777 /mnt/gcs

# The code: fetched fresh on every boot into a new folder, then swapped in.
rm -rf "$ROOT/code.new" && mkdir -p "$ROOT/code.new"
case "$REPO" in
  gs://*)
    gcloud storage cp "$REPO" "$ROOT/code.tar.gz"
    tar -xzf "$ROOT/code.tar.gz" -C "$ROOT/code.new"
    ;;
  *)
    git clone -q "$REPO" "$ROOT/code.new"
    if [ -n "$REF" ]; then git -C "$ROOT/code.new" checkout -q "$REF"; fi
    ;;
esac
test -f "$ROOT/code.new/requirements.txt" || { echo "hapvr startup: $REPO has no requirements.txt" >&2; exit 1; }
rm -rf "$ROOT/code" && mv "$ROOT/code.new" "$ROOT/code"

# The environment: requirements.txt's pins with jax[tpu] (libtpu comes with it).
sed -E 's/^jax==/jax[tpu]==/' "$ROOT/code/requirements.txt" > "$ROOT/requirements-tpu.txt"
grep -q '^jax\[tpu\]==' "$ROOT/requirements-tpu.txt" || { echo "hapvr startup: no jax== pin found" >&2; exit 1; }
[ -x "$ROOT/venv/bin/python" ] || "$PY" -m venv "$ROOT/venv"
"$ROOT/venv/bin/pip" install -q --upgrade pip
"$ROOT/venv/bin/pip" install -q -r "$ROOT/requirements-tpu.txt"
"$ROOT/venv/bin/python" -c 'import jax, flax, optax, orbax.checkpoint, grain; print("jax", jax.__version__)' \
  || { echo "hapvr startup: the environment does not import" >&2; exit 1; }

chmod -R a+rX "$ROOT"
touch "$ROOT/ready"
echo "hapvr startup: ready"

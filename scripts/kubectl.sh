#!/usr/bin/env bash
# kubectl for the tests (`kubectl kustomize manifests/`, kubectl against the API emulator and
# the faithful cluster); sourced by scripts/test.sh after scripts/setup.sh.
#
# A kubectl 1.22 or newer on PATH is used as it is. Debian 12's own package
# (kubernetes-client) is kubectl 1.20: it works with the emulator, but its built-in kustomize
# (v2.0.3) cannot build manifests/ ("json: unknown field \"labels\"": the `labels:` field
# needs kustomize 4.1, i.e. kubectl 1.22). So without a new enough kubectl, the official
# static binary is installed into .venv/bin, checked against its published SHA-256 (the
# install method of kubernetes.io/docs/tasks/tools/install-kubectl-linux/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

KUBECTL_VERSION=${KUBECTL_VERSION:-v1.32.5}
export PATH="$PWD/.venv/bin:$PATH"

kubectl_minor() {
  kubectl version --client -o json 2>/dev/null \
    | .venv/bin/python -c 'import json, sys; print(int(json.load(sys.stdin)["clientVersion"]["minor"].rstrip("+")))' \
    2>/dev/null || echo 0
}

# Download URL, check it against URL.sha256, install it as .venv/bin/kubectl. Python's
# urllib, not curl: a fresh Debian 12 may have neither curl nor wget.
install_kubectl() {
  .venv/bin/python - "$1" <<'PY'
import hashlib, os, sys, urllib.request
url = sys.argv[1]
try:
    with urllib.request.urlopen(url, timeout=120) as r:
        binary = r.read()
    with urllib.request.urlopen(url + ".sha256", timeout=60) as r:
        want = r.read().decode().split()[0]
except OSError as exc:
    sys.exit(f"{url}: {exc}")
if hashlib.sha256(binary).hexdigest() != want:
    sys.exit(f"{url}: SHA-256 mismatch")
with open(".venv/bin/kubectl.part", "wb") as f:
    f.write(binary)
os.chmod(".venv/bin/kubectl.part", 0o755)
os.replace(".venv/bin/kubectl.part", ".venv/bin/kubectl")
PY
}

if ! command -v kubectl >/dev/null || [ "$(kubectl_minor)" -lt 22 ]; then
  arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
  url="https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${arch}/kubectl"
  echo "installing kubectl ${KUBECTL_VERSION} into .venv/bin (from ${url})" >&2
  if ! install_kubectl "$url"; then
    echo "could not install kubectl ${KUBECTL_VERSION}; put kubectl 1.22 or newer on PATH" >&2
    exit 1
  fi
fi

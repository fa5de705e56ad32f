#!/usr/bin/env bash
# Build docker/Dockerfile.cpu for real without a Docker engine, then start the image's own CMD and
# smoke-test it: /healthz, /readyz, one analysis and its delivery to a STOW-RS sink, one STOW-RS
# push, /metrics (docker/smoke_client.py).
#
#   docker/build-and-smoke.sh            (root; Debian packages buildah podman debootstrap)
#
# Then the same for docker/Dockerfile on that base (FLAIRCAD_SMOKE_GPU_DOCKERFILE=0 skips it).
#
# No registry is reachable, so the base is made locally: `debootstrap --variant=minbase` Debian
# bookworm with python3 (3.11), imported as localhost/bookworm-python:local and passed as BASE.
# The rootfs tarball is cached in $FLAIRCAD_IMAGE_CACHE (default /var/cache/flaircad-image) and the
# image stays in containers-storage, so later runs skip debootstrap (FLAIRCAD_REFRESH_BASE=1 redoes
# it). pip inside the build reaches the package index with the host's CA bundle. The working
# container runs with chroot isolation in the host's network namespace, so the server answers on
# the host's loopback. Idempotent; containers and temporary files are removed on exit; exits
# non-zero on any failure; prints the time of each phase.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${FLAIRCAD_IMAGE_CACHE:-/var/cache/flaircad-image}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=localhost/bookworm-python:local
IMAGE=${FLAIRCAD_IMAGE:-localhost/flaircad:cpu}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
STORAGE=(--storage-driver vfs)   # no overlay mounts inside CI's own container
buildah=(buildah "${STORAGE[@]}")
podman=(podman "${STORAGE[@]}")

for tool in buildah podman debootstrap python3; do
    command -v "$tool" >/dev/null || { echo "build-and-smoke: $tool is missing" >&2; exit 2; }
done
((EUID == 0)) || { echo "build-and-smoke: run as root (debootstrap, containers-storage)" >&2; exit 2; }

work=$(mktemp -d /tmp/flaircad-smoke.XXXXXX)
container=""
server_pid=""
timings=()
started=$(date +%s%N)
phase_start=$started
phase() {  # phase NAME: close the running phase under NAME and start the next
    local now
    now=$(date +%s%N)
    timings+=("$(printf '%-40s %6d.%d s' "$1" $(((now - phase_start) / 10**9)) \
        $(((now - phase_start) / 10**8 % 10)))")
    phase_start=$now
}
report() {
    local total=$((($(date +%s%N) - started) / 10**8))
    echo "---- build-and-smoke timings"
    printf '%s\n' "${timings[@]}"
    printf '%-40s %6d.%d s\n' total $((total / 10)) $((total % 10))
}
cleanup() {
    local status=$?
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM -- "-$server_pid" 2>/dev/null || true
        sleep 2
        kill -KILL -- "-$server_pid" 2>/dev/null || true
    fi
    if [[ -n $container ]]; then
        "${buildah[@]}" umount "$container" >/dev/null 2>&1 || true
        "${buildah[@]}" rm "$container" >/dev/null 2>&1 || true
    fi
    if ((status != 0)) && [[ -s $work/server.log ]]; then
        echo "---- server log (last 60 lines)"; tail -n 60 "$work/server.log"
    fi
    rm -rf "$work"
    report
    ((status == 0)) && echo "build-and-smoke: OK" || echo "build-and-smoke: FAILED ($status)" >&2
    exit "$status"
}
trap cleanup EXIT

# 1. The local base image: debootstrap once, then reuse the cached tarball / stored image.
if [[ ${FLAIRCAD_REFRESH_BASE:-0} == 1 ]]; then
    "${podman[@]}" rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
    rm -f "$CACHE/bookworm-python.tar"
fi
if ! "${podman[@]}" image exists "$BASE_IMAGE"; then
    mkdir -p "$CACHE"
    if [[ ! -s $CACHE/bookworm-python.tar ]]; then
        rootfs=$work/rootfs
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
            || { tail -n 30 "$work/debootstrap.log"; exit 1; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$CACHE/bookworm-python.tar.part" .
        mv "$CACHE/bookworm-python.tar.part" "$CACHE/bookworm-python.tar"
        rm -rf "$rootfs"
        phase "debootstrap bookworm"
    fi
    "${podman[@]}" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' "$CACHE/bookworm-python.tar" "$BASE_IMAGE" >/dev/null
    phase "import base image"
fi

# 2-6: build one Dockerfile FROM the local base, check the image, run its CMD, smoke-test it.
build_and_smoke() {
    local dockerfile=$1 image=$2 name=$3
    echo "==== $name: $dockerfile -> $image"
    # 2. Exactly as a user builds it, but FROM the local base. Docker format keeps the
    #    HEALTHCHECK (OCI image configs have no field for it).
    "${buildah[@]}" bud --isolation chroot --format docker \
        --build-arg "BASE=$BASE_IMAGE" \
        --volume /etc/ssl/certs:/etc/ssl/certs:ro --build-arg "PIP_CERT=$CA_BUNDLE" \
        -f "$dockerfile" -t "$image" .
    phase "$name: build image"
    echo "image $image: $("${buildah[@]}" images --format '{{.Size}}' "$image" | head -n 1)"
    "${buildah[@]}" rmi --prune >/dev/null 2>&1 || true   # the builder stage's leftovers

    # 3. Static checks on the image's config and contents.
    "${buildah[@]}" inspect --type image "$image" >"$work/image.json"
    python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
config = json.load(open(f"{work}/image.json"))["Docker"]["config"]
open(f"{work}/cmd", "w").write("\n".join(config["Cmd"]) + "\n")
open(f"{work}/healthcheck", "w").write("\n".join(config["Healthcheck"]["Test"][1:]) + "\n")
assert config["User"] == "10001:10001", config["User"]
assert "8000/tcp" in config["ExposedPorts"], config["ExposedPorts"]
assert config["Healthcheck"]["Test"][0] == "CMD", config["Healthcheck"]
assert config["Cmd"] == ["flaircad", "serve"], config["Cmd"]
env = dict(item.split("=", 1) for item in config["Env"])
assert env["FLAIRCAD_HOST"] == "0.0.0.0" and env["FLAIRCAD_SPOOL_DIR"] == "/var/lib/flaircad", env
print("ok   image config: user 10001, EXPOSE 8000, HEALTHCHECK, CMD flaircad serve, FLAIRCAD_* env")
PY
    container=$("${buildah[@]}" from "$image")
    [[ $("${run[@]}" "$container" -- id -u) == 10001 ]] || { echo "FAIL not uid 10001"; return 1; }
    "${run[@]}" "$container" -- python3 -c '
import importlib.util, shutil
tools = [t for t in ("gcc", "cc", "g++", "make", "pip") if shutil.which(t)]
assert not tools, f"build tools in the final image: {tools}"
assert importlib.util.find_spec("torch") is None, "torch is in the image"
import onnxruntime, service.core.config
assert service.core.config.BUNDLED_MODEL.is_file(), "the demo model is not baked in"
print("ok   uid 10001, no compiler/pip/torch, onnxruntime", onnxruntime.__version__,
      onnxruntime.get_available_providers(), "bundled model", service.core.config.BUNDLED_MODEL.name)'
    phase "$name: inspect image"

    # 4. Phantom series written by the image itself (flaircad phantom) into a host folder.
    rm -rf "${work:?}/series" && mkdir -m 0777 "$work/series"
    local spec label seed
    for spec in "MS 7" "cSVD 8"; do
        read -r label seed <<<"$spec"
        "${run[@]}" --volume "$work/series:/series" "$container" -- \
            flaircad phantom --label "$label" --seed "$seed" --out "/series/$label$seed" >/dev/null
    done
    phase "$name: phantoms"

    # 5. The image's CMD, on a free loopback port (the image's default host 0.0.0.0 would listen
    #    on every interface of the CI machine: the smoke test narrows it to 127.0.0.1).
    #    Authentication stays on, as the image ships (issue 6): an API key file mounted
    #    read-only, as a Kubernetes Secret or a compose secret would be.
    local port sink_port base rootfs cmd check written token="" auth=()
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    rm -rf "${work:?}/secrets" && mkdir -m 0755 "$work/secrets"
    if "${run[@]}" "$container" -- python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("service.runtime.auth") is None)'; then
        token=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
        printf 'smoke:%s\n' "$token" >"$work/secrets/api-keys" && chmod 0644 "$work/secrets/api-keys"
        auth=(--volume "$work/secrets:/run/secrets/flaircad:ro"
              --env FLAIRCAD_API_KEYS_FILE=/run/secrets/flaircad/api-keys)
    else
        echo "note this build has no service.runtime.auth (issue 6): requests without a token"
    fi
    base=http://127.0.0.1:$port
    # a STOW-RS sink on the host's loopback (docker/smoke_client.py starts it): the image must
    # deliver a result with its own install (httpx was once only a dev extra)
    sink_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    rootfs=$("${buildah[@]}" mount "$container")
    touch "$work/started"
    mapfile -t cmd <"$work/cmd"
    setsid "${run[@]}" --env FLAIRCAD_HOST=127.0.0.1 --env "FLAIRCAD_PORT=$port" \
        --env FLAIRCAD_STABILITY_WINDOW_S=1 "${auth[@]}" \
        --env "FLAIRCAD_DESTINATIONS=[{\"name\": \"smoke-sink\", \"kind\": \"stow\", \"url\": \"http://127.0.0.1:$sink_port/dicom-web\"}]" \
        --env FLAIRCAD_DELIVERY_BACKOFF_S=1 \
        "$container" -- "${cmd[@]}" >"$work/server.log" 2>&1 &
    server_pid=$!
    until python3 -c "import urllib.request; urllib.request.urlopen('$base/healthz', timeout=2)" 2>/dev/null; do
        kill -0 "$server_pid" 2>/dev/null || { echo "FAIL the server exited"; return 1; }
        (($(date +%s%N) - phase_start < 120 * 10**9)) || { echo "FAIL no /healthz in 120 s"; return 1; }
        sleep 0.5
    done
    phase "$name: server start (/healthz)"
    # The HEALTHCHECK exactly as the image declares it, inside the container.
    mapfile -t check <"$work/healthcheck"
    "${run[@]}" --env "FLAIRCAD_PORT=$port" "$container" -- "${check[@]}" \
        || { echo "FAIL HEALTHCHECK"; return 1; }
    echo "ok   HEALTHCHECK command succeeds"
    FLAIRCAD_SMOKE_TOKEN=$token FLAIRCAD_SMOKE_SINK_PORT=$sink_port \
        python3 docker/smoke_client.py "$base" "$work/series/MS7" \
        "$work/series/cSVD8"
    phase "$name: smoke requests"

    # 6. SIGTERM: the server must stop by itself.
    kill -TERM -- "-$server_pid"
    for _ in $(seq 60); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$server_pid" 2>/dev/null; then echo "FAIL still running 30 s after SIGTERM"; return 1; fi
    server_pid=""
    echo "ok   stopped on SIGTERM"
    # buildah run cannot mount the root read-only (and podman run cannot start containers in
    # this sandbox: crun may not set rlimits), so check instead that the server wrote nothing
    # outside the spool and /tmp, which is all Kubernetes and compose leave writable.
    written=$(cd "$rootfs" && find . -xdev -newer "$work/started" ! -type d \
        ! -path './var/lib/flaircad/*' ! -path './tmp/*' -print | head -n 20)
    if [[ -n $written ]]; then
        echo "FAIL the server wrote outside /var/lib/flaircad and /tmp:"; echo "$written"; return 1
    fi
    echo "ok   nothing written outside /var/lib/flaircad and /tmp (a read-only root will do)"
    "${buildah[@]}" umount "$container" >/dev/null
    "${buildah[@]}" rm "$container" >/dev/null
    container=""
    phase "$name: shutdown"
}

run=("${buildah[@]}" run --isolation chroot)
build_and_smoke docker/Dockerfile.cpu "$IMAGE" cpu
# docker/Dockerfile (GPU) FROM the same Debian base instead of the CUDA image, which cannot be
# pulled here: it proves that Dockerfile's steps and the service's fallback to the CPU provider,
# not CUDA. About 1.5 min more (a 256 MB onnxruntime-gpu wheel, a 1 GB image);
# FLAIRCAD_SMOKE_GPU_DOCKERFILE=0 skips it.
if [[ ${FLAIRCAD_SMOKE_GPU_DOCKERFILE:-1} == 1 ]]; then
    build_and_smoke docker/Dockerfile localhost/flaircad:gpu-on-debian gpu-dockerfile
fi

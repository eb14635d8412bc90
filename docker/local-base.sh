#!/usr/bin/env bash
# Local stand-ins for Flower's official base images, for a machine that cannot reach Docker Hub:
# fedclip-local/superlink:VERSION and fedclip-local/supernode:VERSION, made from a Debian bookworm
# root file system (debootstrap, Python 3.11) with flwr==VERSION installed as the official images
# have it (docker/local-base.Dockerfile). Then build the demo on them:
#
#   docker/local-base.sh [--host-pip-config] [--flwr VERSION] [--mirror URL]
#   FLWR_REPOSITORY=fedclip-local docker compose -f docker/compose.yml -f docker/compose.cpu.yml up --build -d
#
# Needs root, debootstrap and a Docker engine (DOCKER_HOST). Images that exist are kept (remove
# them to rebuild). --host-pip-config copies this machine's /etc/pip.conf and CA bundle into the
# stand-ins, for a machine whose package registry is reached through its own proxy or mirror; the
# images built on them then carry that configuration, so keep them on this machine.
set -euo pipefail

flwr_version=1.28.0 host_pip_config=0
mirror=$(sed -n 's/^URIs: *\(.*debian\/*\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
mirror=${mirror:-http://deb.debian.org/debian}
while (($#)); do
  case $1 in
    --flwr) flwr_version=$2; shift 2 ;;
    --mirror) mirror=$2; shift 2 ;;
    --host-pip-config) host_pip_config=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "local-base.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

debian=fedclip-local/debian-py:bookworm
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! docker image inspect "$debian" > /dev/null 2>&1; then
  command -v debootstrap > /dev/null || { echo "local-base.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
  echo "debootstrap bookworm from $mirror (a few minutes)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log" \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
         "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* "$work"/rootfs/usr/share/locale/*
  tar -C "$work/rootfs" -c . | docker import - "$debian"
fi

mkdir -p "$work/context/registry"
if ((host_pip_config)); then
  mkdir -p "$work/context/registry/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$work/context/registry/ssl/certs/"
  [[ -f /etc/pip.conf ]] && cp /etc/pip.conf "$work/context/registry/"
fi
cp "$here/local-base.Dockerfile" "$work/context/Dockerfile"
for role in superlink supernode; do
  image=fedclip-local/$role:$flwr_version
  if docker image inspect "$image" > /dev/null 2>&1; then
    echo "kept $image (docker rmi it to rebuild)"
    continue
  fi
  # --network host: pip inside the build reaches the registry the way this machine does
  DOCKER_BUILDKIT=0 docker build --network host --target "$role" --build-arg "DEBIAN_IMAGE=$debian" \
    --build-arg "FLWR_VERSION=$flwr_version" -t "$image" "$work/context"
done
docker image ls --filter 'reference=fedclip-local/*'

#!/usr/bin/env bash
# The system packages the test suite needs, in one place (`make test` runs this; so does CI
# through `make test`):
# - ffcv (the `ffcv` extra, built from source by pip) compiles against libturbojpeg and
#   OpenCV headers (+ a C++ compiler and the Python headers);
# - a real one-node SLURM (slurmctld + slurmd + munge) for tests/test_cluster.py.
# As root with apt-get: installs what is missing. Otherwise prints the one apt command.
# Exit status: 0 when ffcv can be built here, 1 when its headers are missing (`make test`
# then installs without the ffcv extra and the FFCV tests are skipped, with the reason).
set -uo pipefail
PKGS="build-essential python3-dev pkg-config libturbojpeg0-dev libopencv-dev slurm-wlm munge"

ffcv_buildable() {
    command -v pkg-config > /dev/null && pkg-config --exists libturbojpeg &&
        { pkg-config --exists opencv4 || pkg-config --exists opencv; }
}
missing() {  # the packages of $PKGS that dpkg does not list as installed
    local p out=""
    for p in $PKGS; do
        dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q "install ok installed" || out="$out $p"
    done
    echo "$out"
}

if command -v apt-get > /dev/null && command -v dpkg-query > /dev/null; then
    need=$(missing)
    if [ -n "$need" ]; then
        if [ "$(id -u)" = 0 ]; then
            echo "system packages: installing$need" >&2
            apt-get update -qq &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need > /dev/null ||
                echo "system packages: apt-get install failed" >&2
        else
            echo "system packages missing:$need; as root run: apt-get update && apt-get install -y$need" >&2
        fi
    fi
fi
if ffcv_buildable; then
    exit 0
fi
echo "system packages: no libturbojpeg/OpenCV headers: the ffcv extra is not installed and the FFCV tests are skipped" \
     "(as root: apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev)" >&2
exit 1

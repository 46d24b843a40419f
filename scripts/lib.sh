# shellcheck shell=bash
# Helpers sourced by scripts/setup, scripts/test and scripts/demo.
#
# Source it as:   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# It sets no shell options of its own; the caller runs under `set -euo pipefail`.

# Name printed in front of every log line: the script that sourced us.
PLANT_SCRIPT_NAME=${PLANT_SCRIPT_NAME:-$(basename "${0:-plant}")}

# log MESSAGE... — one prefixed line on stderr, so stdout stays for real output.
log() {
    printf '[%s] %s\n' "$PLANT_SCRIPT_NAME" "$*" >&2
}

# die MESSAGE... — log and exit non-zero.
die() {
    log "error: $*"
    exit 1
}

# repo_root — absolute path of the repository (the folder above scripts/), whatever
# the current directory is and whether or not this is a git checkout.
repo_root() {
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
}

# as_root CMD... — run CMD as root: directly when we are root, else through sudo.
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*' and sudo is not installed; run this script as root"
    fi
}

# Whether `apt-get update` already ran in this process.
_PLANT_APT_UPDATED=${_PLANT_APT_UPDATED:-0}

# apt_installed PKG — true when dpkg says PKG is fully installed (not merely
# "deinstall ok config-files", for which `dpkg -s` alone also succeeds).
apt_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
    [[ $status == "install ok installed" ]]
}

# need_apt PKG... — install the Debian packages that are missing, and only those.
# Runs `apt-get update` at most once per process, and only when something is missing.
need_apt() {
    local missing=() pkg
    command -v dpkg-query >/dev/null 2>&1 ||
        die "dpkg-query not found: these scripts expect a Debian or Ubuntu machine"
    for pkg in "$@"; do
        apt_installed "$pkg" || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "apt: all present ($*)"
        return 0
    fi
    log "apt: installing ${missing[*]}"
    # apt's chatter goes to a file, shown only when something fails.
    local out
    out=$(mktemp)
    if [[ $_PLANT_APT_UPDATED -eq 0 ]]; then
        if ! as_root apt-get update -q >"$out" 2>&1; then
            tail -n 30 "$out" >&2
            rm -f "$out"
            die "apt-get update failed"
        fi
        _PLANT_APT_UPDATED=1
    fi
    if ! as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >"$out" 2>&1; then
        tail -n 30 "$out" >&2
        rm -f "$out"
        die "apt-get install ${missing[*]} failed"
    fi
    log "apt: $(grep -E '^[0-9]+ upgraded, [0-9]+ newly installed' "$out" || echo "installed ${missing[*]}")"
    rm -f "$out"
}

# workspace_rust_version — the minimum Rust the workspace builds with: `rust-version` in
# the top-level Cargo.toml, the one place that says it (the scripts read it, never copy it).
workspace_rust_version() {
    local version
    version=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$(repo_root)/Cargo.toml" | head -n 1)
    [[ -n $version ]] || die "no rust-version = \"…\" line in $(repo_root)/Cargo.toml"
    echo "$version"
}

# rust_install_advice — the exact commands, one per indented line, that give this machine a
# new enough stable Rust. Debian 13 and Ubuntu 24.04 package rustup; Debian 12 does not, so
# there the advice is rustup's own installer.
rust_install_advice() {
    if command -v rustup >/dev/null 2>&1; then
        printf '    rustup update stable\n    rustup default stable'
        return 0
    fi
    # `apt-cache show` succeeds for a name it merely knows of; madison lists real versions.
    if [[ -n $(apt-cache madison rustup 2>/dev/null) ]]; then
        printf '    apt-get install rustup\n'
    else
        printf "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y\n"
    fi
    printf '    . "$HOME/.cargo/env"\n    rustup default stable'
}

# ensure_cargo — make cargo reachable (rustup's ~/.cargo/bin may be off PATH in a
# non-login shell) and check that rustc is at least the workspace's rust-version; when
# either is missing, stop with the commands that fix it.
ensure_cargo() {
    local bin minimum rustc_version
    if ! command -v cargo >/dev/null 2>&1; then
        for bin in "${CARGO_HOME:-${HOME:-/root}/.cargo}/bin" "${HOME:-/root}/.cargo/bin"; do
            if [[ -x $bin/cargo ]]; then
                export PATH="$bin:$PATH"
                log "cargo: added $bin to PATH"
                break
            fi
        done
    fi
    minimum=$(workspace_rust_version)
    if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
        die "cargo and rustc not found: this workspace needs Rust >= $minimum (rust-version in \
Cargo.toml). Install it with:
$(rust_install_advice)
and run this script again."
    fi
    rustc_version=$(rustc --version 2>/dev/null | awk '{print $2}')
    if [[ -z $rustc_version ]] ||
        ! printf '%s\n%s\n' "$minimum" "${rustc_version%%-*}" | sort -V -C; then
        die "rustc ${rustc_version:-(version unknown)} is older than $minimum, the rust-version in \
Cargo.toml. Get a newer one with:
$(rust_install_advice)
and run this script again."
    fi
}

# python_venv [REQUIREMENTS_FILE] — a virtualenv at target/pyenv built with the
# machine's python3, with REQUIREMENTS_FILE (default scripts/requirements.txt)
# installed. pip runs only when target/pyenv/.installed-<hash> is absent, the hash
# covering the requirements and the interpreter version.
python_venv() {
    local root venv req py hash marker
    root=$(repo_root)
    venv="$root/target/pyenv"
    req=${1:-$root/scripts/requirements.txt}
    [[ -f $req ]] || die "requirements file not found: $req"

    # A venv whose interpreter is gone (python upgraded or removed) is rebuilt.
    if [[ -e $venv ]] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
        log "python: $venv is broken, rebuilding it"
        rm -rf "$venv"
    fi

    if [[ ! -x $venv/bin/python ]]; then
        command -v python3 >/dev/null 2>&1 || need_apt python3
        py=$(command -v python3)
        # Debian splits venv/ensurepip out of python3 into python3-venv.
        if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
            need_apt python3-venv
        fi
        log "python: creating $venv with $py ($("$py" --version 2>&1))"
        mkdir -p "$root/target"
        "$py" -m venv "$venv" || die "python3 -m venv $venv failed"
    fi

    hash=$({ cat "$req"; "$venv/bin/python" -VV; } | sha256sum | cut -c1-16)
    marker="$venv/.installed-$hash"
    if [[ -e $marker ]]; then
        log "python: $venv up to date ($(basename "$req"))"
        return 0
    fi
    log "python: pip install -r $req"
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        "$venv/bin/python" -m pip install -q -r "$req" </dev/null ||
        die "pip install -r $req failed"
    rm -f "$venv"/.installed-*
    touch "$marker"
}

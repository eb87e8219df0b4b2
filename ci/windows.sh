#!/usr/bin/env bash
# Builds echoport for Windows (x86_64-pc-windows-gnu) and runs its checks under wine.
#
#   ci/windows.sh [all]      set up (once), clippy for Windows, unit tests under wine,
#                            end-to-end checks (what CI runs)
#   ci/windows.sh setup      only install the toolchain and create the wine prefix
#   ci/windows.sh build      build the Windows binaries (target/windows/x86_64-pc-windows-gnu)
#   ci/windows.sh clippy     clippy for the Windows target (-D warnings)
#   ci/windows.sh unit       the crates' tests under wine (wine is cargo's runner)
#   ci/windows.sh e2e        echoport.exe serve under wine, Linux clients over 127.0.0.1
#   ci/windows.sh test       unit + e2e
#   ci/windows.sh cargo ARGS...  any cargo command for the Windows target
#
# Every command sets up first (a no-op when everything is in place). docs/WINDOWS.md says
# more.
#
# Everything it needs comes from Debian's packages: rustc-web/cargo-web/rust-web-src (a
# current Rust whose standard library we build from source for the Windows target, since
# rustup cannot add targets here), the mingw-w64 cross toolchain, and wine64. Wine is for
# correctness only, never for performance figures.
#
# Environment (all optional):
#   ECHOPORT_WIN_TARGET_DIR  cargo target dir for the Windows build (default: target/windows)
#   WINEPREFIX               wine prefix (default: ~/.cache/echoport/wine)
#   ECHOPORT_WIN_SKIP_INSTALL=1  do not call apt-get (the packages are already there)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
target=x86_64-pc-windows-gnu
export ECHOPORT_WIN_TARGET_DIR=${ECHOPORT_WIN_TARGET_DIR:-$root/target/windows}
export WINEPREFIX=${WINEPREFIX:-$HOME/.cache/echoport/wine}
export WINEDEBUG=${WINEDEBUG:--all}
# No Mono, no Gecko: nothing here needs them, and wineboot would otherwise try to fetch them.
export WINEDLLOVERRIDES=${WINEDLLOVERRIDES:-mscoree,mshtml=}
packages=(rustc-web cargo-web rust-web-src rust-web-clippy gcc-mingw-w64-x86-64 wine64)

log() { printf '[windows.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# Debian's Rust (package rustc-web installs it as /usr/bin/rustc): its binaries, not rustup's,
# which come first on PATH.
find_debian_rust() {
    local d=/usr/bin
    if [[ -x $d/rustc && -x $d/cargo && -d /usr/lib/rustlib/src/rust/library ]]; then
        echo "$d"
        return 0
    fi
    return 1
}

find_wine64() {
    for w in /usr/lib/wine/wine64 /usr/lib/x86_64-linux-gnu/wine/wine64 "$(command -v wine64 || true)"; do
        if [[ -n $w && -x $w ]]; then
            echo "$w"
            return 0
        fi
    done
    return 1
}

install_packages() {
    local missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    if [[ ${ECHOPORT_WIN_SKIP_INSTALL:-0} == 1 ]]; then
        log "missing packages: ${missing[*]} (and ECHOPORT_WIN_SKIP_INSTALL=1)"
        exit 1
    fi
    log "installing ${missing[*]}"
    # A private archive directory: this machine's apt clean-up hook deletes downloaded .debs
    # from the shared one, racing the install.
    local archives
    archives=$(mktemp -d /tmp/echoport-apt.XXXXXX)
    mkdir -p "$archives/partial"
    chmod 755 "$archives"
    chown _apt "$archives/partial" 2>/dev/null || true
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        -o Dir::Cache::archives="$archives" "${missing[@]}" >/dev/null
    rm -rf "$archives"
}

# Wine 8.0's bcryptprimitives.dll lacks ProcessPrng, which current Rust std imports; this DLL
# provides it by forwarding to BCryptGenRandom.
build_prng_dll() {
    local out=$1
    if [[ -f $out && $out -nt $here/windows/bcryptprimitives.c ]]; then
        return 0
    fi
    mkdir -p "$(dirname "$out")"
    x86_64-w64-mingw32-gcc -O2 -shared -s -o "$out" \
        "$here/windows/bcryptprimitives.c" "$here/windows/bcryptprimitives.def" -lbcrypt
}

make_prefix() {
    local wine64=$1
    local sys32=$WINEPREFIX/drive_c/windows/system32
    if [[ ! -f $WINEPREFIX/system.reg ]]; then
        log "creating wine prefix $WINEPREFIX"
        mkdir -p "$WINEPREFIX"
        "$wine64" wineboot --init >/dev/null 2>&1 || true
        "$(dirname "$wine64")/wineserver" -w 2>/dev/null || true
    fi
    if [[ ! -f $sys32/kernel32.dll ]]; then
        log "wine prefix $WINEPREFIX is incomplete"
        exit 1
    fi
    build_prng_dll "$ECHOPORT_WIN_TARGET_DIR/prng/bcryptprimitives.dll"
    if ! cmp -s "$ECHOPORT_WIN_TARGET_DIR/prng/bcryptprimitives.dll" "$sys32/bcryptprimitives.dll"; then
        cp "$ECHOPORT_WIN_TARGET_DIR/prng/bcryptprimitives.dll" "$sys32/bcryptprimitives.dll"
    fi
}

setup() {
    install_packages
    RUST_BIN=$(find_debian_rust) || {
        log "Debian's rustc-web not found"
        exit 1
    }
    WINE64=$(find_wine64) || {
        log "wine64 not found"
        exit 1
    }
    export RUSTC=$RUST_BIN/rustc RUSTDOC=$RUST_BIN/rustdoc
    export CARGO=$RUST_BIN/cargo
    # -Zbuild-std is unstable; this is the toolchain's own standard library source.
    export RUSTC_BOOTSTRAP=1
    export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
    export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=$WINE64
    export CARGO_TARGET_DIR=$ECHOPORT_WIN_TARGET_DIR
    # Our native bcryptprimitives.dll (ProcessPrng) before wine's builtin one.
    export WINEDLLOVERRIDES="$WINEDLLOVERRIDES;bcryptprimitives=n,b"
    make_prefix "$WINE64"
}

# Debian's cargo with the standard library built from source for the Windows target. Debian's
# /usr/bin first on PATH, so that `cargo clippy` finds Debian's cargo-clippy and clippy-driver
# (rustup's would not read a standard library built by a different rustc).
wcargo() {
    # -Zbuild-std as configuration (CARGO_UNSTABLE_BUILD_STD), which also reaches the
    # `cargo check` that cargo-clippy runs.
    (cd "$root" && PATH=/usr/bin:$PATH CARGO_UNSTABLE_BUILD_STD=std "$CARGO" "$1" --target "$target" "${@:2}")
}

# What must build for Windows: the libraries with all their tests, and the binary with its
# unit tests (its integration tests, and echoport-testkit, drive Linux tools).
clippy() {
    wcargo clippy -p echoport-core -p echoport-io --all-targets -- -D warnings
    wcargo clippy -p echoport --bins -- -D warnings
    wcargo clippy -p echoport --bins --profile test -- -D warnings
}

# The crates' own tests under wine (cargo's runner): the echo state machine, and the IOCP
# backend driven in-process (zero-byte receives, allowances, pool checks, accept dealing, drop).
unit_tests() {
    wcargo test -p echoport-core -p echoport-io
    # The binary's own unit tests (argument parsing, binding); its integration tests drive
    # Linux tools and stay Linux-only.
    wcargo test -p echoport --bins
}

# `echoport serve` under wine, with Linux clients over 127.0.0.1.
e2e_tests() {
    wcargo build -p echoport --bin echoport
    python3 "$here/windows/e2e.py" "$WINE64" "$ECHOPORT_WIN_TARGET_DIR/$target/debug/echoport.exe"
}

cmd=${1:-all}
start=$SECONDS
setup
log "set up in $((SECONDS - start)) s ($("$RUSTC" --version), $("$WINE64" --version))"
case $cmd in
setup) ;;
build)
    wcargo build -p echoport-core -p echoport-io --all-targets
    wcargo build -p echoport --bins
    ;;
clippy)
    clippy
    ;;
unit)
    unit_tests
    ;;
e2e)
    e2e_tests
    ;;
test | all)
    if [[ $cmd == all ]]; then
        clippy
        log "clippy clean at $((SECONDS - start)) s"
    fi
    unit_tests
    log "unit tests passed at $((SECONDS - start)) s"
    e2e_tests
    ;;
cargo)
    shift
    wcargo "$@"
    ;;
*)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
log "done in $((SECONDS - start)) s"

#!/usr/bin/env bash
# test.sh: the one command that runs mdsync's whole test suite. It installs what the
# tests need when it is missing (Dovecot, sshd, rsync via apt; the `vmail` system user;
# rustfmt/clippy via rustup), then runs cargo fmt --check, cargo clippy and cargo test,
# and prints a summary. It never skips a test: a missing prerequisite it cannot install
# is an error (exit 1).
#
# Usage (from anywhere, as root: doveadm refuses root, the tests drop to `vmail`):
#     bash scripts/test.sh
set -euo pipefail

readonly APT_PACKAGES=(dovecot-core dovecot-imapd openssh-server rsync)
readonly MAIL_USER=vmail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

say() { printf '== %s\n' "$*"; }
die() { printf 'test.sh: %s\n' "$*" >&2; exit 1; }

# Names of the system tools the tests need that are not installed.
missing_tools() {
    local missing=()
    command -v doveadm >/dev/null || missing+=(doveadm)
    [[ -x /usr/lib/dovecot/imap ]] || missing+=(imap)
    command -v sshd >/dev/null || [[ -x /usr/sbin/sshd ]] || missing+=(sshd)
    command -v rsync >/dev/null || missing+=(rsync)
    echo "${missing[*]}"
}

install_system_tools() {
    local missing
    missing=$(missing_tools)
    [[ -z $missing ]] && return
    [[ $(id -u) -eq 0 ]] || die "missing: $missing; run as root so apt-get can install ${APT_PACKAGES[*]}"
    say "installing ${APT_PACKAGES[*]} (missing: $missing)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y "${APT_PACKAGES[@]}"
    missing=$(missing_tools)
    [[ -z $missing ]] || die "still missing after apt-get install: $missing"
}

ensure_mail_user() {
    id "$MAIL_USER" >/dev/null 2>&1 && return
    [[ $(id -u) -eq 0 ]] || die "system user $MAIL_USER missing; run as root to create it"
    say "creating system user $MAIL_USER"
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin "$MAIL_USER"
}

ensure_rust_tools() {
    command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
    if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
        return
    fi
    command -v rustup >/dev/null || die "cargo fmt/clippy missing and rustup not found"
    say "installing rustfmt and clippy"
    rustup component add rustfmt clippy
}

# Results of the cargo steps, printed by summary.
STEP_NAMES=()
STEP_RESULTS=()

# step NAME CMD...: runs one check, records PASS/FAIL, never stops the script.
step() {
    local name=$1
    shift
    say "$name: $*"
    local start=$SECONDS
    if "$@"; then
        STEP_RESULTS+=("PASS ($((SECONDS - start))s)")
    else
        STEP_RESULTS+=("FAIL (exit $?, $((SECONDS - start))s)")
    fi
    STEP_NAMES+=("$name")
}

summary() {
    local i failed=0
    echo
    say "summary (dovecot $(dovecot --version 2>/dev/null || echo '?'), $(cargo --version))"
    for i in "${!STEP_NAMES[@]}"; do
        printf '   %-8s %s\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}"
        [[ ${STEP_RESULTS[$i]} == PASS* ]] || failed=1
    done
    if ((failed)); then
        say "FAILED"
        return 1
    fi
    say "all passed"
}

main() {
    install_system_tools
    ensure_mail_user
    ensure_rust_tools
    [[ $(id -u) -eq 0 ]] ||
        die "the end-to-end tests run doveadm, which must start as root to drop to $MAIL_USER: run as root"
    step fmt cargo fmt --check
    step clippy cargo clippy --all-targets -- -D warnings
    step test cargo test --all-targets
    summary
}

main "$@"

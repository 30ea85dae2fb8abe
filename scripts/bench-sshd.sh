#!/usr/bin/env bash
# shellcheck disable=SC2154  # W and log come from the sourcing script
# bench-sshd.sh: sourced by bench-remote.sh and bench-sync.sh. A throwaway sshd on
# 127.0.0.1 (the same setup as tests/support/sshd.rs), its files under $W/ssh: start_sshd
# sets sshd_pid, port, SSH (the client command line as an array) and RSH (as one string);
# stop_sshd stops it and its per-connection processes, by PID.

# "PPID STARTTIME" of a live, non-zombie process, from /proc/PID/stat; fails otherwise.
proc_stat() {
  local stat rest
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  rest=${stat##*) }
  # shellcheck disable=SC2086  # split the fields
  set -- $rest
  [ "$1" != Z ] || return 1
  echo "$2 ${20}"
}

# alive PID STARTTIME: PID is still the process that had that start time.
alive() { local s; s=$(proc_stat "$1") && [ "${s#* }" = "$2" ]; }

# "PID STARTTIME" of each process whose parent is $1.
children_of() {
  local d pid ppid start
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    read -r ppid start < <(proc_stat "$pid" || echo "- -") || continue
    if [ "$ppid" = "$1" ]; then echo "$pid $start"; fi
  done
}

# Stops our sshd and its per-connection processes (listed while the listener lives):
# SIGTERM, then SIGKILL after 3 s. A PID is signalled only while it still has the start time
# it had when it was listed, so a recycled PID is never hit.
stop_sshd() {
  [ -n "$sshd_pid" ] || return 0
  local pid=$sshd_pid start=$sshd_start kids="" i kpid kstart
  sshd_pid=""
  if alive "$pid" "$start"; then
    kids=$(children_of "$pid")
    while read -r kpid kstart; do
      if [ -n "$kpid" ] && alive "$kpid" "$kstart"; then kill -TERM "$kpid" 2>/dev/null || true; fi
    done <<<"$kids"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do alive "$pid" "$start" || break; sleep 0.02; done
    if alive "$pid" "$start"; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  wait "$pid" 2>/dev/null || true
  while read -r kpid kstart; do
    [ -n "$kpid" ] || continue
    for ((i = 0; i < 150; i++)); do alive "$kpid" "$kstart" || break; sleep 0.02; done
    if alive "$kpid" "$kstart"; then kill -KILL "$kpid" 2>/dev/null || true; fi
  done <<<"$kids"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts sshd on a free port (another one when it cannot bind), waits until `ssh ... true`
# works; sets sshd_pid, port, SSH (the client command line as an array) and RSH (as a string).
start_sshd() {
  local d=$W/ssh attempt i
  [ -d /run/sshd ] || install -d -m 755 /run/sshd   # privilege separation dir, as systemd makes it
  mkdir -p "$d"
  ssh-keygen -q -t ed25519 -N '' -C mdsync-bench-host -f "$d/host_ed25519" </dev/null
  ssh-keygen -q -t ed25519 -N '' -C mdsync-bench-user -f "$d/user_ed25519" </dev/null
  cp "$d/user_ed25519.pub" "$d/authorized_keys"
  for ((attempt = 1; attempt <= 5; attempt++)); do
    port=$(free_port)
    cat >"$d/sshd_config" <<CONF
# Throwaway sshd for an mdsync benchmark: loopback only, keys only, files in $d.
ListenAddress 127.0.0.1
Port $port
AddressFamily inet
HostKey $d/host_ed25519
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
AuthorizedPrincipalsFile none
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
UseDNS no
PermitUserRC no
PermitUserEnvironment no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowAgentForwarding no
AllowTcpForwarding no
MaxStartups 100
MaxSessions 100
SetEnv SHLVL=1
LogLevel VERBOSE
CONF
    /usr/sbin/sshd -D -e -f "$d/sshd_config" </dev/null >/dev/null 2>"$d/sshd.log" &
    sshd_pid=$!
    sshd_start=$(proc_stat "$sshd_pid") && sshd_start=${sshd_start#* } || sshd_start=gone
    SSH=(ssh -p "$port" -i "$d/user_ed25519" -o StrictHostKeyChecking=no
         -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o IdentitiesOnly=yes
         -o LogLevel=ERROR -F /dev/null)
    RSH="${SSH[*]}"
    for ((i = 0; i < 100; i++)); do
      if ! kill -0 "$sshd_pid" 2>/dev/null; then break; fi
      if timeout 5 "${SSH[@]}" 127.0.0.1 true </dev/null 2>"$d/probe.err"; then return 0; fi
      sleep 0.1
    done
    if kill -0 "$sshd_pid" 2>/dev/null; then
      log "sshd on port $port did not accept \`ssh ... true\` within 10 s:"
      cat "$d/probe.err" "$d/sshd.log" >&2; exit 1
    fi
    wait "$sshd_pid" 2>/dev/null || true
    sshd_pid=""
    if ! grep -q -e 'Address already in use' -e 'Cannot bind any address' "$d/sshd.log"; then
      log "sshd exited before accepting a login:"; cat "$d/sshd.log" >&2; exit 1
    fi
  done
  log "sshd could not bind a free port in 5 attempts"; exit 1
}

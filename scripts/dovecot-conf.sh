#!/usr/bin/env bash
# dovecot-conf.sh: sourced by the scripts that drive doveadm standalone (no Dovecot service;
# see dovecot-standalone.md). Defines write_dovecot_conf DIR, which writes DIR/dovecot.conf
# and creates DIR/run for it. Mail is accessed as the `vmail` user; the namespace separator
# is `/`. It never starts a service and writes nothing outside DIR.

write_dovecot_conf() {
    local dir=$1
    mkdir -p "$dir/run"
    cat >"$dir/dovecot.conf" <<CONF
# Minimal standalone config for doveadm (no dovecot service running).
base_dir = $dir/run
state_dir = $dir/run/state
log_path = /dev/stderr
info_log_path = /dev/stderr
protocols =
ssl = no
mail_uid = vmail
mail_gid = vmail
mail_location = maildir:~/Maildir
namespace inbox {
  inbox = yes
  separator = /
}
CONF
}
